"""The curation as a list of datatrove jobs (one executor each), built from the spec.

Every stage reads the shards the stage before it wrote and writes its own (the last one writes DIR/data/), so each
stage's documents, timing and completion markers stand on their own. Writing a shard costs ~1% of a stage that
tokenizes (measured here: 0.26 s per 6 MB read and written, against 22 s for Gopher quality). A stage is one job,
except deduplication, which first makes signatures of every shard, then finds duplicates across shards, and then
filters each shard:

    exact_dedup    signatures (tasks) -> find (min(tasks, 16) hash ranges) -> filter (tasks)
    minhash_dedup  signatures (tasks) -> buckets (one per band) -> cluster (1) -> filter (tasks)

Hashing is datatrove's sha1 (its default xxhash breaks with xxhash 4.x). The input job splits the corpus into
`run.tasks` shards; a final job writes stats.json and the plots.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.dedup import (ExactDedupFilter, ExactDedupSignature, ExactFindDedups, MinhashDedupBuckets,
                                      MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig as DTExactConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig as DTMinhashConfig
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.utils.hashing import HashConfig

from data.curate.decontam import Decontaminate
from data.curate.io import (JsonlRangeReader, RemovedWriter, ShardReader, originals_writer, output_writer,
                            shard_writer)
from data.curate.pii import ScrubPII
from data.curate.spec import CurateConfig, bands_rows
from data.curate.stats import Finalize, StatsStep
from data.curate.text import SimpleWords, earlier_first, normalized_text, raw_text

HASH = HashConfig(precision=64, hash_fc="sha1")


@dataclasses.dataclass
class Job:
    name: str  # also its logging folder under DIR/work/logs/
    stage: str  # the stage it belongs to ("input", a stage name, or "stats")
    pipeline: list
    tasks: int
    last: bool = True  # the stage's last job: its documents are out when this one is done


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything lives under the output folder."""
    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"

    def shards(self, i: int, stage: str) -> str:
        return str(self.work / "shards" / f"{i:02d}_{stage}")

    def stats(self, i: int, stage: str) -> str:
        return str(self.work / "stats" / f"{i:02d}_{stage}")

    def dedup(self, stage: str, part: str) -> str:
        return str(self.work / "dedup" / stage / part)

    def removed(self, stage: str) -> str:
        return str(self.root / "removed" / stage)

    def logs(self, job: str) -> str:
        return str(self.work / "logs" / job)

    @property
    def data(self) -> str:
        return str(self.root / "data")


class C4Filter(C4QualityFilter):
    """C4's rules, and what they change in kept documents recorded. C4's line rules drop lines (and strip each
    line, and remove citations) in documents it keeps: the dropped lines per rule go into the document's metadata
    for the stage's statistics (stats.json: c4's `lines_dropped` and `documents_changed`), and the text a kept
    document had before, when C4 dropped lines from it (reason lines_dropped) or changed more than whitespace
    (text_edited, e.g. citations removed), goes to DIR/removed/c4_lines/ (not counted as removed). A document
    whose lines were all dropped is removed, with its text as it came in, rather than kept empty (only possible
    with c4.min_num_sentences -1)."""

    def __init__(self, *args, originals_writer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.originals_writer = originals_writer
        self._dropped: Counter = Counter()

    def stat_update(self, *labels, value: int = 1, unit: str | None = None):
        for label in labels:
            if label.startswith("line-filter-"):
                self._dropped[label[len("line-filter-"):]] += value
        super().stat_update(*labels, value=value, unit=unit)

    def filter(self, doc):
        original = doc.text
        self._dropped = Counter()
        result = super().filter(doc)
        if result is not True:
            return result
        if not doc.text.strip():
            doc.text = original
            return False, "c4_no_lines_left"
        if doc.text != original:
            doc.metadata["changed"] = True  # read (and dropped) by the stage's StatsStep, as c4_lines is
            if self._dropped:
                doc.metadata["c4_lines"] = dict(self._dropped)
            if self._dropped or "".join(doc.text.split()) != "".join(original.split()):
                doc.metadata["c4_original"] = (original, "lines_dropped" if self._dropped else "text_edited")
        return result

    def run(self, data, rank: int = 0, world_size: int = 1):
        with self.originals_writer if self.originals_writer else contextlib.nullcontext() as writer:
            for doc in super().run(data, rank, world_size):
                before = doc.metadata.pop("c4_original", None)
                if before and writer:
                    writer.write(Document(text=before[0], id=doc.id, metadata={"filter_reason": before[1]}), rank)
                yield doc


def _filter_step(cfg: CurateConfig, stage: str, writer: RemovedWriter, eval_files: list[str], layout: Layout):
    if stage == "gopher_quality":
        g = cfg.gopher_quality
        return GopherQualityFilter(
            min_doc_words=g.min_doc_words, max_doc_words=g.max_doc_words, min_avg_word_length=g.min_avg_word_length,
            max_avg_word_length=g.max_avg_word_length, max_symbol_word_ratio=g.max_symbol_word_ratio,
            max_bullet_lines_ratio=g.max_bullet_lines_ratio, max_ellipsis_lines_ratio=g.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=g.min_alpha_words_ratio, min_stop_words=g.min_stop_words,
            exclusion_writer=writer)
    if stage == "gopher_repetition":
        g = cfg.gopher_repetition
        return GopherRepetitionFilter(
            dup_line_frac=g.dup_line_frac, dup_para_frac=g.dup_para_frac, dup_line_char_frac=g.dup_line_char_frac,
            dup_para_char_frac=g.dup_para_char_frac, top_n_grams=g.top_n_grams, dup_n_grams=g.dup_n_grams,
            exclusion_writer=writer)
    if stage == "c4":
        c = cfg.c4
        return C4Filter(
            exclusion_writer=writer, split_paragraph=c.split_paragraph, remove_citations=c.remove_citations,
            filter_no_terminal_punct=c.filter_no_terminal_punct, min_num_sentences=c.min_num_sentences,
            min_words_per_line=c.min_words_per_line, max_word_length=c.max_word_length,
            filter_lorem_ipsum=c.filter_lorem_ipsum, filter_javascript=c.filter_javascript,
            filter_curly_bracket=c.filter_curly_bracket, filter_policy=c.filter_policy,
            originals_writer=originals_writer(layout.removed("c4_lines")))
    if stage == "decontaminate":
        d = cfg.decontaminate
        return Decontaminate(eval_files, text_field=d.text_field, n=d.n, exclusion_writer=writer)
    raise AssertionError(stage)


def plan(cfg: CurateConfig, layout: Layout, input_files: list[tuple[str, int]], input_root: str,
         eval_files: list[str], header: dict) -> list[Job]:
    """The jobs of a curation, in the order they must run."""
    n = cfg.run.tasks
    stages = list(cfg.stages)
    stats_dirs = [("input", layout.stats(0, "input"))]
    src = layout.shards(0, "input") if stages else layout.data
    first = shard_writer(src) if stages else output_writer(src, cfg.output.format)
    jobs = [Job("00_input", "input", [
        JsonlRangeReader(input_files, input_root, cfg.input.text_field, cfg.input.id_field, layout.stats(0, "input")),
        StatsStep(layout.stats(0, "input")), first], n)]
    for i, stage in enumerate(stages, start=1):
        tag = f"{i:02d}_{stage}"
        stats = layout.stats(i, stage)
        stats_dirs.append((stage, stats))
        is_last = i == len(stages)
        writer = output_writer(layout.data, cfg.output.format) if is_last else shard_writer(layout.shards(i, stage))
        tail = [StatsStep(stats), writer]
        if stage == "exact_dedup":
            dt = DTExactConfig(content_getter=normalized_text if cfg.exact_dedup.normalize else raw_text,
                               document_priority=earlier_first, hash_config=HASH)
            finders = min(n, 16)
            sigs, dups = layout.dedup(stage, "signatures"), layout.dedup(stage, "duplicates")
            jobs += [
                Job(f"{tag}.1_signatures", stage, [ShardReader(src), ExactDedupSignature(sigs, config=dt, finder_workers=finders)], n, False),
                Job(f"{tag}.2_find", stage, [ExactFindDedups(sigs, dups, config=dt)], finders, False),
                Job(f"{tag}.3_filter", stage, [ShardReader(src), ExactDedupFilter(
                    dups, config=dt, exclusion_writer=RemovedWriter(layout.removed(stage), stats, "exact_duplicate")),
                    *tail], n)]
        elif stage == "minhash_dedup":
            bands, rows = bands_rows(cfg.minhash)
            dt = DTMinhashConfig(n_grams=cfg.minhash.n_grams, num_buckets=bands, hashes_per_bucket=rows,
                                 seed=cfg.minhash.seed, hash_config=HASH)
            sigs, buckets = layout.dedup(stage, "signatures"), layout.dedup(stage, "buckets")
            remove = layout.dedup(stage, "remove_ids")
            jobs += [
                Job(f"{tag}.1_signatures", stage,
                    [ShardReader(src), MinhashDedupSignature(sigs, config=dt, language=SimpleWords())], n, False),
                Job(f"{tag}.2_buckets", stage, [MinhashDedupBuckets(sigs, buckets, config=dt)], bands, False),
                Job(f"{tag}.3_cluster", stage, [MinhashDedupCluster(buckets, remove, config=dt)], 1, False),
                Job(f"{tag}.4_filter", stage, [ShardReader(src), MinhashDedupFilter(
                    remove, exclusion_writer=RemovedWriter(layout.removed(stage), stats, "near_duplicate")),
                    *tail], n)]
        elif stage == "pii":
            p = cfg.pii
            jobs.append(Job(tag, stage, [ShardReader(src), ScrubPII(
                emails=p.emails, ips=p.ips, only_public_ips=p.only_public_ips, phones=p.phones, cards=p.cards,
                phone_region=p.phone_region), *tail], n))
        elif stage == "decontaminate" and not eval_files:
            jobs.append(Job(tag, stage, [ShardReader(src), *tail], n))  # no evaluation set: passes everything
        else:
            removed = RemovedWriter(layout.removed(stage), stats, stage)
            step = _filter_step(cfg, stage, removed, eval_files, layout)
            jobs.append(Job(tag, stage, [ShardReader(src), step, *tail], n))
        src = layout.shards(i, stage)
    jobs.append(Job(f"{len(stages) + 1:02d}_stats", "stats",
                    [Finalize(str(layout.root), stats_dirs, header, cfg.run.keep_work)], 1))
    return jobs
