"""Statistics before the first stage and after each one, merged into DIR/stats.json.

Each stage's pipeline ends with a `StatsStep` that counts the documents it passes (documents, tokens, characters,
UTF-8 bytes, a token-length histogram, and what the stage changed in the documents it kept: `documents_changed`,
PII replacements per kind (`replaced`), C4's dropped lines per rule (`lines_dropped`)) and writes one small JSON per
task.
Removal reasons come from the stage's RemovedWriter (io.py), skipped input lines from the input reader. `merge_stage`
adds a stage's task files up; `Finalize` (the last job, so it also runs on a cluster) writes stats.json and the
plots. Tokens are counted with text.TOKEN_RE: runs of word characters plus each punctuation mark on its own.
"""
from __future__ import annotations

import bisect
import json
import shutil
import time
from collections import Counter
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from data.curate.text import count_tokens

# Token-length histogram bins, four per doubling of length: [0, 1), [1, 2), ..., [181, 215), [215, 256), ...
# [861, 1024), ... up to 2**24 tokens, and one open bin above. Fixed, so tasks' histograms add up.
EDGES = [0] + sorted({int(2 ** (k / 4)) for k in range(97)})


def _snapshot() -> dict:
    return {"documents": 0, "tokens": 0, "characters": 0, "bytes": 0, "documents_changed": 0, "replaced": {},
            "lines_dropped": {}, "hist": [0] * len(EDGES)}


class StatsStep(PipelineStep):
    """Passes documents through, counting them; writes `<rank>.json` into its folder when the task's input ends."""

    name = "📊 meshforge stats"
    type = "📊 - STATS"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        snap, replaced, lines = _snapshot(), Counter(), Counter()
        for doc in data:
            with self.track_time():
                text = doc.text
                tokens = count_tokens(text)
                snap["documents"] += 1
                snap["tokens"] += tokens
                snap["characters"] += len(text)
                snap["bytes"] += len(text.encode("utf-8", "surrogatepass"))
                snap["hist"][bisect.bisect_right(EDGES, tokens) - 1] += 1
                replaced.update(doc.metadata.pop("pii", None) or {})
                lines.update(doc.metadata.pop("c4_lines", None) or {})
                snap["documents_changed"] += bool(doc.metadata.pop("changed", False))
            yield doc
        snap["replaced"], snap["lines_dropped"] = dict(replaced), dict(lines)
        with get_datafolder(self.folder).open(f"{rank:05d}.json", "w") as f:
            json.dump(snap, f)


def _read_jsons(folder: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))] if folder.is_dir() else []


def merge_stage(folder: Path) -> dict:
    """One stage's statistics from its tasks' files: the kept documents' counts plus removal/skip reasons."""
    total = _snapshot()
    replaced: Counter = Counter()
    lines: Counter = Counter()
    for snap in _read_jsons(folder, "[0-9]*.json"):
        for k in ("documents", "tokens", "characters", "bytes", "documents_changed"):
            total[k] += snap.get(k, 0)
        total["hist"] = [a + b for a, b in zip(total["hist"], snap["hist"])]
        replaced.update(snap["replaced"])
        lines.update(snap.get("lines_dropped", {}))
    removed, skipped = Counter(), Counter()
    for counts in _read_jsons(folder, "removed_*.json"):
        removed.update(counts)
    for counts in _read_jsons(folder, "skipped_*.json"):
        skipped.update(counts)
    out = {k: total[k] for k in ("documents", "tokens", "characters", "bytes")}
    out["removed_by_reason"] = dict(sorted(removed.items()))
    if skipped:
        out["skipped"] = dict(sorted(skipped.items()))
    if total["documents_changed"]:  # kept documents whose text the stage changed (c4's line drops, pii)
        out["documents_changed"] = total["documents_changed"]
    if replaced:
        out["replaced"] = dict(sorted(replaced.items()))
    if lines:
        out["lines_dropped"] = dict(sorted(lines.items()))
    last = max((i for i, c in enumerate(total["hist"]) if c), default=0)
    out["length_histogram"] = {"unit": "tokens", "edges": EDGES[: last + 2], "counts": total["hist"][: last + 1]}
    return out


class Finalize(PipelineStep):
    """The last job: DIR/stats.json (one entry per stage, input first), DIR/plots/*.png, and, unless the spec keeps
    them, removal of the intermediate shards and signatures under DIR/work/."""

    name = "📊 meshforge stats.json"
    type = "📊 - STATS"

    def __init__(self, out_dir: str, stages: list[tuple[str, str]], header: dict, keep_work: bool):
        super().__init__()
        self.out_dir = out_dir
        self.stages = stages  # (stage name, its stats folder), input first
        self.header = header
        self.keep_work = keep_work

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        out = Path(self.out_dir)
        stats = build_stats(out, self.stages, self.header)
        tmp = out / "stats.json.tmp"
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
        from data.curate.plots import plot_stats  # matplotlib only here

        plot_stats(stats, out / "plots")
        if not self.keep_work:
            for sub in ("shards", "dedup"):
                shutil.rmtree(out / "work" / sub, ignore_errors=True)
        tmp.replace(out / "stats.json")  # last: its presence says the curation is complete


def build_stats(out: Path, stages: list[tuple[str, str]], header: dict) -> dict:
    timings = json.loads((out / "work" / "timings.json").read_text()) if (out / "work" / "timings.json").is_file() \
        else {}
    entries, before = [], None
    for name, folder in stages:
        entry = {"stage": name, **merge_stage(Path(folder))}
        if before is not None:
            entry["documents_in"] = before
            entry["removed"] = before - entry["documents"]
        if name in timings:
            entry["seconds"] = round(timings[name], 3)
        entries.append(entry)
        before = entry["documents"]
    first, last = entries[0], entries[-1]
    summary = {"documents_in": first["documents"], "documents_out": last["documents"],
               "tokens_in": first["tokens"], "tokens_out": last["tokens"],
               "bytes_in": first["bytes"], "bytes_out": last["bytes"]}
    if timings:
        summary["seconds"] = round(sum(timings.values()), 3)
    return {**header, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary,
            "tokens_counted_as": "runs of word characters, plus each other non-space character on its own",
            "stages": entries}
