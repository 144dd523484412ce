"""meshforge curate: MinHash near-duplicate recall/precision at threshold 0.8, PII scrubbing, decontamination,
statistics (what C4 and PII changed in kept documents too), identical results on a rerun, with 2 workers and after a
resumed failure, --overwrite starting clean, and one-line errors.

Corpora are generated here: random-word documents with planted near-duplicate and hard-negative pairs at measured
shingle Jaccard similarities (MinHash only, no spaCy), and a small tinyshakespeare demo corpus (data/curate/demo.py)
with planted duplicates, PII and an evaluation set for the full pipeline.
"""
import dataclasses
import importlib.util
import itertools
import json
import os
import random
import re
from pathlib import Path

import pytest

for _module in ("datatrove", "orjson", "spacy", "phonenumbers", "matplotlib"):
    pytest.importorskip(_module)

from cli.main import main  # noqa: E402
from data.curate import curate  # noqa: E402
from data.curate.demo import make_corpus, near_copy, pii_items, pii_sentence, shingle_jaccard  # noqa: E402
from data.curate.pii import ScrubPII, luhn_valid  # noqa: E402
from data.curate.run import CurationFailed  # noqa: E402
from data.curate.spec import (C4Config, CurateConfig, GopherQualityConfig, InputConfig, MinhashConfig,  # noqa: E402
                              OutputConfig, RunConfig, bands_rows, catch_probability)
from data.curate.stats import StatsStep  # noqa: E402

ALL = ("exact_dedup", "minhash_dedup", "gopher_repetition", "gopher_quality", "c4", "decontaminate", "pii")


def _jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _read(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for f in sorted(folder.glob("*.jsonl")) for r in map(json.loads, f.read_text().splitlines())}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _spec(corpus: Path, out: Path, **run) -> CurateConfig:
    return CurateConfig(input=InputConfig(path=str(corpus)), output=OutputConfig(path=str(out)),
                        run=RunConfig(**{"tasks": 4, "workers": 1, **run}))


# --- MinHash: recall and precision on planted pairs ------------------------------------------------------------------

def test_minhash_threshold_08_finds_planted_near_duplicates(tmp_path):
    rng = random.Random(0)
    vocab = sorted({"".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(3, 8)))
                    for _ in range(6000)})

    def doc():
        return "\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(12, 16))) + "." for _ in range(8))

    base = [doc() for _ in range(450)]
    records = [{"id": f"base-{i}", "text": t} for i, t in enumerate(base)]
    near, negatives = [], []
    for i in range(100):  # documents edited to shingle Jaccard 0.85-0.95 with their source: must be caught
        copy, _ = near_copy(base[i], rng, vocab, 0.85, 0.95)
        records.append({"id": f"near-{i}", "text": copy})
        near.append((f"base-{i}", f"near-{i}"))
    for i in range(100, 160):  # hard negatives at 0.3-0.5 (caught with probability <= 0.012): must not be
        copy, _ = near_copy(base[i], rng, vocab, 0.3, 0.5)
        records.append({"id": f"far-{i}", "text": copy})
        negatives.append((f"base-{i}", f"far-{i}"))
    close = []  # negatives at 0.6-0.75, just under the threshold: caught as the S-curve says (0.07-0.50), see below
    for i in range(160, 220):
        copy, sim = near_copy(base[i], rng, vocab, 0.6, 0.75)
        records.append({"id": f"close-{i}", "text": copy})
        close.append((f"base-{i}", f"close-{i}", sim))
    rng.shuffle(records)
    corpus = _jsonl(tmp_path / "corpus.jsonl", records)

    cfg = dataclasses.replace(_spec(corpus, tmp_path / "out"), stages=("minhash_dedup",))
    assert bands_rows(cfg.minhash) == (12, 10)  # the default threshold 0.8 with 120 hashes
    stats = curate(cfg)
    removed = set(_read(tmp_path / "out" / "removed" / "minhash_dedup"))
    kept = set(_read(tmp_path / "out" / "data"))
    assert removed | kept == {r["id"] for r in records} and not removed & kept
    caught = [a in removed or b in removed for a, b in near]
    recall = sum(caught) / len(near)
    true_removals = {d for pair in near for d in pair if d in removed and (set(pair) - {d}) <= kept}
    close_docs = {d for a, b, _ in close for d in (a, b)}
    # recall >= 0.95 on the pairs at >= 0.85 with precision >= 0.95 against the negatives at 0.3-0.5 (measured: 1.00
    # and 1.00)
    precision = len(true_removals) / max(1, len(removed - close_docs))
    assert recall >= 0.95, (recall, len(near))
    assert precision >= 0.95, (precision, sorted(removed - close_docs - true_removals))
    assert not any(a in removed and b in removed for a, b in near)  # one kept per cluster
    # Against negatives at 0.6-0.75, precision >= 0.95 is not met, by a documented choice (spec.py's docstring):
    # candidate pairs are not verified, and no banding of 120 hashes catches >= 95% of pairs at 0.85 and <= 5% of
    # pairs at 0.6 (that takes 240 hashes, 20 x 12; at 0.75, ~21,000); the 12 x 10 banding picked for threshold 0.8
    # catches a pair at 0.75 half the time. Measured here: 24 of the 60 close pairs (at 0.68-0.75) caught, 20.7
    # expected; precision with them counted as negatives 0.81. Asserted: they are caught as the curve says.
    p = [catch_probability(sim, 12, 10) for *_, sim in close]
    close_caught = sum(a in removed or b in removed for a, b, _ in close)
    sd = sum(q * (1 - q) for q in p) ** 0.5
    assert abs(close_caught - sum(p)) <= 4 * sd + 1, (close_caught, sum(p), sd)
    entry = stats["stages"][1]
    assert entry["removed_by_reason"] == {"near_duplicate": len(removed)}
    assert stats["minhash"]["catch_probability"]["0.90"] > 0.99 and stats["minhash"]["catch_probability"]["0.50"] < 0.02


def test_minhash_bands_rows_and_curve():
    assert bands_rows(MinhashConfig(bands=14, rows=8, num_hashes=112, threshold=0.72)) == (14, 8)
    assert bands_rows(MinhashConfig(rows=10)) == (12, 10)
    assert catch_probability(0.9, 12, 10) == pytest.approx(1 - (1 - 0.9 ** 10) ** 12)
    assert shingle_jaccard("a b c d e f", "a b c d e f") == 1.0


# --- PII, on its own ------------------------------------------------------------------------------------------------

def test_pii_scrubber_replaces_valid_items_and_leaves_luhn_failures():
    rng = random.Random(3)
    step = ScrubPII()
    for _ in range(40):
        items = pii_items(rng)
        assert luhn_valid(re.sub(r"\D", "", items["card"])) and not luhn_valid(re.sub(r"\D", "", items["card_invalid"]))
        text, counts = step.scrub(f"Hello there.\n{pii_sentence(items)}\nThe end.")
        for kind in ("email", "ip", "phone", "card"):
            assert items[kind] not in text, (kind, items[kind], text)
        assert items["card_invalid"] in text, text
        assert counts == {"email": 1, "ip": 1, "phone": 1, "card": 1}, (counts, text)
        # the number before the card and its MM/YY stay (the card's grouping can make "card MM" one 18-digit number
        # that passes Luhn; then the month goes with the card)
        expected = pii_sentence({**items, "email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "card": "<CARD>"})
        month = items["card_expiry"].split("/")[0]
        assert text.splitlines()[1] in (expected, expected.replace(f"<CARD> {month}/", "<CARD>/")), text
    untouched = "Order 4111 1111 1111 1112 shipped on 2024-01-15 at 10:30; see ISBN 978-3-16-148410-0, 192.168.1.1."
    assert step.scrub(untouched) == (untouched, {})  # Luhn failure, a date, an ISBN, a private IP
    # a digit group next to a card or phone number does not hide it
    for text, scrubbed, counts in [
        ("Visa 4111 1111 1111 1111 12/25, cvv 123.", "Visa <CARD> 12/25, cvv 123.", {"card": 1}),
        ("Card 4111-1111-1111-1111 2025", "Card <CARD> 2025", {"card": 1}),
        ("card #1 4111 1111 1111 1111 ok", "card #1 <CARD> ok", {"card": 1}),
        ("amex 3782 822463 10005 03/26 or 4111111111111111 12/25", "amex <CARD> 03/26 or <CARD> 12/25", {"card": 2}),
        ("Call 202 555 0143 24 hours a day.", "Call <PHONE> 24 hours a day.", {"phone": 1}),
        ("Call +1 202 555 0143 24 hours", "Call <PHONE> 24 hours", {"phone": 1}),
        ("Call (202) 555-0143 24 hours", "Call <PHONE> 24 hours", {"phone": 1}),
    ]:
        assert step.scrub(text) == (scrubbed, counts), text
    # card-like numbers that fail Luhn stay exactly as they were, next to other numbers too, and shield no phone
    for text in ["order 4111 1111 1111 1112", "order 4111 1111 1111 1112 2025", "ref 12 4111 1111 1111 1112 99 ok",
                 "order 3782 822463 10006 03/26", "order #7 4111-1111-1111-1112 09/27", "1 2 3 4 5 6 7 8 9 10 11 12"]:
        assert step.scrub(text) == (text, {}), text


# --- the full pipeline on the demo corpus ---------------------------------------------------------------------------

def _demo(root: Path, max_docs: int = 120, stages: tuple[str, ...] = ALL) -> tuple[CurateConfig, dict, list[dict]]:
    """A small demo corpus, 5 documents sharing 13 words with the evaluation set and 5 sharing only 12, and the
    default spec's thresholds for it (one worker, intermediate shards kept)."""
    corpus = root / "corpus.jsonl"
    m = make_corpus(corpus, seed=1, max_docs=max_docs, exact=12, near=12, pii=16, eval_passages=8)
    rng = random.Random(1)
    evals = [json.loads(line)["text"].split() for line in Path(m["eval_path"]).read_text().splitlines()]
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    plain = [r for r in records if r["id"].startswith("doc-") and r["id"] not in m["eval_sources"]]
    for k, r in enumerate(rng.sample(plain, 10)):
        words = evals[k % len(evals)][:13 if k < 5 else 12]
        r["text"] += "\n" + " ".join(w.upper() if i % 3 else w for i, w in enumerate(words)) + "!"
    _jsonl(corpus, records)
    cfg = CurateConfig(
        input=InputConfig(path=str(corpus)), output=OutputConfig(path=str(root / "out")),
        run=RunConfig(tasks=4, workers=1, keep_work=True), stages=stages,
        gopher_quality=GopherQualityConfig(min_alpha_words_ratio=0.7),
        c4=C4Config(filter_no_terminal_punct=False, min_words_per_line=-1))
    cfg = dataclasses.replace(cfg, decontaminate=dataclasses.replace(cfg.decontaminate, eval_path=m["eval_path"]))
    return cfg, m, records


def _check_stats(out: Path, stats: dict, records: list[dict], manifest: dict) -> None:
    entries = stats["stages"]
    assert [e["stage"] for e in entries] == ["input", *ALL]
    assert entries[0]["documents"] == len(records)
    token = re.compile(r"\w+|[^\w\s]")
    assert entries[0]["tokens"] == sum(len(token.findall(r["text"])) for r in records)
    for before, e in itertools.pairwise(entries):
        assert e["documents_in"] == before["documents"]
        assert e["removed"] == e["documents_in"] - e["documents"] == sum(e["removed_by_reason"].values())
        assert len(_read(out / "removed" / e["stage"])) == e["removed"]
        assert sum(e["length_histogram"]["counts"]) == e["documents"]
    assert entries[-1]["documents"] == len(_read(out / "data")) == stats["summary"]["documents_out"]
    assert entries[1]["removed_by_reason"] == {"exact_duplicate": 12}
    position = {r["id"]: i for i, r in enumerate(records)}
    exact_removed = _read(out / "removed" / "exact_dedup")
    assert set(exact_removed) == {max(pair, key=position.get) for pair in manifest["exact"]}  # the later copy
    assert all(set(r) == {"id", "text", "reason"} for r in exact_removed.values())
    assert entries[2]["removed_by_reason"] == {"near_duplicate": 12}
    for name in ("documents.png", "removed.png", "lengths.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_pii(out: Path, stats: dict, manifest: dict) -> None:
    kept = _read(out / "data")
    text = "\n".join(r["text"] for r in kept.values())
    planted = [p for p in manifest["pii"] if p["id"] in kept]
    assert len(planted) >= 10  # most PII documents reach the end: the check is not vacuous
    for p in planted:
        for kind in ("email", "ip", "phone", "card"):
            assert p[kind] not in text, (kind, p[kind])
        doc = kept[p["id"]]["text"]
        assert p["card_invalid"] in doc
        assert f"{p['card_before']} <CARD> {p['card_expiry']}" in doc or f"{p['card_before']} <CARD>/" in doc, doc
    pii = stats["stages"][-1]
    replaced = pii["replaced"]
    assert replaced["email"] == replaced["ip"] == replaced["phone"] == replaced["card"] == text.count("<CARD>")
    assert replaced["card"] >= len(planted)
    assert pii["documents_changed"] == sum("<CARD>" in r["text"] for r in kept.values())


def _check_decontamination(out: Path, manifest: dict) -> None:
    def grams(text):
        words = re.sub(r"[^\w\s]", " ", text.lower()).split()
        return {tuple(words[i:i + 13]) for i in range(len(words) - 12)}

    evals = set().union(*(grams(json.loads(line)["text"])
                          for line in Path(manifest["eval_path"]).read_text().splitlines()))
    stage_input = _read(next((out / "work" / "shards").glob("*_c4")))  # what decontamination was given
    expected = {i for i, r in stage_input.items() if grams(r["text"]) & evals}
    removed = _read(out / "removed" / "decontaminate")
    assert set(removed) == expected
    assert len(expected) >= 10  # the 5 planted 13-word overlaps plus evaluation sources
    assert all(r["reason"] == "eval_13gram" for r in removed.values())


def test_demo_curation_every_stage_and_the_same_with_two_workers(tmp_path):
    cfg, manifest, records = _demo(tmp_path)
    out = tmp_path / "out"
    stats = curate(cfg)
    _check_stats(out, stats, records, manifest)
    _check_pii(out, stats, manifest)
    _check_decontamination(out, manifest)

    from data.sources import resolve_files  # the curation folder is a meshforge data source: its data/ only

    assert resolve_files("data", str(out)) == sorted((out / "data").glob("*.jsonl"))

    out2 = tmp_path / "out2"
    stats2 = curate(dataclasses.replace(cfg, output=OutputConfig(path=str(out2)),
                                        run=dataclasses.replace(cfg.run, workers=2)))
    for sub in ("data", "removed"):
        assert _tree(out2 / sub) == _tree(out / sub)
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in stats2["stages"]]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in stats["stages"]]


def test_failed_stage_resumes_without_redoing_finished_tasks(tmp_path, monkeypatch):
    cfg, _, _ = _demo(tmp_path, max_docs=60, stages=("exact_dedup", "gopher_quality", "pii"))
    reference = curate(cfg)
    out3 = tmp_path / "out3"
    cfg3 = dataclasses.replace(cfg, output=OutputConfig(path=str(out3)))
    run = StatsStep.run

    def failing(self, data, rank=0, world_size=1):
        if rank == 1 and self.folder.endswith("_gopher_quality"):
            raise RuntimeError("planted failure")
        yield from run(self, data, rank, world_size)

    monkeypatch.setattr(StatsStep, "run", failing)
    with pytest.raises(CurationFailed, match="stage gopher_quality .*planted failure"):
        curate(cfg3)
    monkeypatch.setattr(StatsStep, "run", run)
    logs = {p: p.stat().st_mtime_ns for p in (out3 / "work" / "logs").glob("*/logs/task_*.log")}
    assert not (out3 / "stats.json").exists() and logs
    resumed = curate(cfg3)  # the same command again: continues
    redone = {str(p.relative_to(out3 / "work" / "logs")) for p, t in logs.items() if p.stat().st_mtime_ns != t}
    assert redone == {"02_gopher_quality/logs/task_00001.log"}  # rank 0 of the stage had finished; rank 1 had not
    for sub in ("data", "removed"):  # and the result is the uninterrupted run's
        assert _tree(out3 / sub) == _tree(tmp_path / "out" / sub)
    assert [e["documents"] for e in resumed["stages"]] == [e["documents"] for e in reference["stages"]]


# --- input splitting -----------------------------------------------------------------------------------------------

def test_input_is_split_by_bytes_and_ids_come_from_lines(tmp_path):
    lines = [json.dumps({"text": f"document number {i} " + "word " * (i % 7)}) for i in range(53)]
    lines[10], lines[20] = "", "not json"
    corpus = tmp_path / "in" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("\n".join(lines) + "\n")
    stats = curate(dataclasses.replace(_spec(corpus, tmp_path / "out", tasks=5), stages=()))
    kept = _read(tmp_path / "out" / "data")
    expected = {f"corpus.jsonl:{i + 1}": json.loads(line)["text"] for i, line in enumerate(lines) if i not in (10, 20)}
    assert {k: r["text"] for k, r in kept.items()} == expected
    assert stats["stages"][0]["skipped"] == {"not_a_json_object": 1}
    assert len(list((tmp_path / "out" / "data").glob("*.jsonl"))) == 5  # every task got a share


# --- command line: one-line errors, exit 2 ---------------------------------------------------------------------------

@pytest.fixture()
def tiny(tmp_path):
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": f"a small document {i}."} for i in range(6)])
    spec = tmp_path / "spec.py"
    spec.write_text("from data.curate.spec import CurateConfig, RunConfig\n\n"
                    "def get_config():\n    return CurateConfig(run=RunConfig(tasks=2, workers=1), "
                    "stages=('exact_dedup',))\n")
    return tmp_path, corpus, spec


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main(["curate", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("extra, message", [
    (["--stages", "exact_dedup,bogus"], "stages: unknown stage 'bogus'; known: exact_dedup, minhash_dedup"),
    (["--stages", "minhash_dedup", "--minhash.bands", "10", "--minhash.rows", "10"],
     "minhash: bands 10 x rows 10 = 100 hashes, not minhash.num_hashes 120"),
    (["--minhash.bandz", "3"], "did you mean 'minhash.bands'"),
    (["--run.executor", "ray"], "run.executor ray: the ray package is not installed"),
])
def test_cli_bad_spec_is_one_line_exit_2(tiny, capsys, extra, message):
    if "ray" in extra and importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here")
    tmp, corpus, spec = tiny
    rc, err = _cli(capsys, spec, "--input", corpus, "--output", tmp / "out", *extra)
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp / "out").exists()


def test_cli_slurm_without_sbatch_is_one_line(tiny, capsys, monkeypatch):
    tmp, corpus, spec = tiny
    monkeypatch.setenv("PATH", str(tmp))
    rc, err = _cli(capsys, spec, "--input", corpus, "--output", tmp / "out", "--run.executor", "slurm",
                   "--slurm.partition", "cpu")
    assert rc == 2 and len(err.splitlines()) == 1 and "sbatch is not on PATH" in err, err


def test_slurm_jobs_are_chained_and_their_tasks_give_the_local_result(tiny, monkeypatch):
    """With a stand-in sbatch: one job array per job, each after the one before; then every task run as a Slurm node
    would (unpickling the executor datatrove wrote, SLURM_ARRAY_TASK_ID set) gives what a local run gives."""
    import signal

    import dill

    tmp, corpus, _ = tiny
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\nn=$(( $(cat "$0.n" 2>/dev/null || echo 100) + 1 ))\necho $n > "$0.n"\n'
                                    'echo "$@" >> "$0.calls"\necho "Submitted batch job $n"\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    for tool in ("sbatch", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    local = dataclasses.replace(_spec(corpus, tmp / "local", tasks=3), stages=("exact_dedup", "pii"))
    curate(local)
    cfg = dataclasses.replace(local, output=OutputConfig(path=str(tmp / "slurm")),
                              run=RunConfig(executor="slurm", tasks=3))
    cfg = dataclasses.replace(cfg, slurm=dataclasses.replace(cfg.slurm, partition="cpu"))
    submitted = curate(cfg)["submitted"]
    jobs = [c for c in (bin_dir / "sbatch.calls").read_text().splitlines() if "RUN_OFFSET" in c]
    assert len(jobs) == len(submitted) == 6  # input, exact dedup's three steps, pii, stats
    for before, call in zip(submitted, jobs[1:]):
        assert f"--dependency=afterok:{before}" in call
    assert not (tmp / "slurm" / "stats.json").exists()
    for name in ("NODE_RANK", "EXECUTOR", "NODE_IPS", "CPUS_PER_TASK", "MEM_PER_CPU", "GPUS_ON_NODE"):
        monkeypatch.setenv(f"DATATROVE_{name}", "")  # a task sets them; monkeypatch then removes them again
    usr1 = signal.getsignal(signal.SIGUSR1)  # and a Slurm task installs a requeue handler
    try:
        for folder in sorted((tmp / "slurm" / "work" / "logs").glob("0*")):  # what each array task would run
            for task in range(len(json.loads((folder / "ranks_to_run.json").read_text()))):
                monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
                monkeypatch.setenv("SLURM_NODELIST", "node1")
                with (folder / "executor.pik").open("rb") as f:
                    dill.load(f).run()
    finally:
        signal.signal(signal.SIGUSR1, usr1)
    for sub in ("data", "removed"):
        assert _tree(tmp / "slurm" / sub) == _tree(tmp / "local" / sub)
    assert (tmp / "slurm" / "stats.json").is_file()


def test_ray_executor_is_built_from_the_spec(tmp_path):
    from datatrove.executor import RayPipelineExecutor

    from data.curate.executors import make_executor
    from data.curate.stages import Job

    cfg = CurateConfig(run=RunConfig(executor="ray", tasks=6, workers=3))
    ray = make_executor(cfg, Job("01_pii", "pii", [], 6), str(tmp_path / "logs"))
    assert isinstance(ray, RayPipelineExecutor) and (ray.tasks, ray.workers) == (6, 3)


def test_cli_output_folder_rules(tiny, capsys, monkeypatch):
    tmp, corpus, spec = tiny
    out = tmp / "parent" / "out"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    sibling = tmp / "parent" / "sibling.txt"
    sibling.write_text("keep me")
    rc, err = _cli(capsys, spec, "--input", corpus, "--output", out)
    assert rc == 2 and len(err.splitlines()) == 1 and "is not empty; pass --overwrite" in err, err
    assert (out / "old.txt").exists()

    rc, _ = _cli(capsys, spec, "--input", corpus, "--output", out, "--overwrite")
    assert rc == 0 and not (out / "old.txt").exists() and (out / "stats.json").is_file()
    assert sibling.read_text() == "keep me" and corpus.is_file()

    rc, err = _cli(capsys, spec, "--input", corpus, "--output", out)  # finished: not resumed, not redone
    assert rc == 2 and "finished curation" in err, err
    rc, err = _cli(capsys, spec, "--input", corpus, "--output", out, "--stages", "pii")
    assert rc == 2 and "changed: " in err, err

    monkeypatch.chdir(out)
    rc, err = _cli(capsys, spec, "--input", corpus, "--output", ".", "--overwrite")
    assert rc == 2 and "it is the current folder" in err, err
    rc, err = _cli(capsys, spec, "--input", corpus, "--output", tmp, "--overwrite")
    assert rc == 2 and "holds the input" in err, err
    assert (out / "stats.json").is_file() and sibling.is_file() and corpus.is_file()


def test_overwrite_starts_clean_and_a_broken_spec_json_is_refused(tiny, capsys):
    tmp, corpus, spec = tiny
    out = tmp / "out"
    assert _cli(capsys, spec, "--input", corpus, "--output", out)[0] == 0
    reference = _tree(out / "data")
    for finished in (True, False):  # a finished curation, and an unfinished one of the same spec (which a run
        if not finished:             # without --overwrite resumes): --overwrite empties the folder first
            (out / "stats.json").unlink()
        (out / "work" / "marker").write_text("from before")
        rc, _ = _cli(capsys, spec, "--input", corpus, "--output", out, "--overwrite")
        assert rc == 0 and not (out / "work" / "marker").exists(), finished
        assert (out / "stats.json").is_file() and _tree(out / "data") == reference

    for broken in ('{"fingerprint": {"input": ', "[1, 2]", '{"spec": {}}', ""):  # truncated, foreign, empty
        (out / "work" / "spec.json").write_text(broken)
        rc, err = _cli(capsys, spec, "--input", corpus, "--output", out)
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert "work/spec.json is not a curation's" in err and "pass --overwrite" in err, err
    rc, _ = _cli(capsys, spec, "--input", corpus, "--output", out, "--overwrite")
    assert rc == 0 and json.loads((out / "work" / "spec.json").read_text())["fingerprint"]


def test_c4_records_dropped_lines_and_keeps_the_text_it_changed(tmp_path):
    sentences = " ".join(f"Sentence number {k} is here." for k in range(6))
    records = [{"id": "clean", "text": sentences},
               {"id": "edited", "text": f"{sentences}\nno terminal punctuation here\nshort.\nThis cites a source [1]."},
               {"id": "policy", "text": f"{sentences}\nRead our privacy policy before you go."}]
    corpus = _jsonl(tmp_path / "corpus.jsonl", records)
    stats = curate(dataclasses.replace(_spec(corpus, tmp_path / "out", tasks=1), stages=("c4",)))
    c4 = stats["stages"][1]
    assert c4["documents"] == 3 and c4["removed_by_reason"] == {}
    assert c4["lines_dropped"] == {"no_terminal_punc": 1, "too_few_words": 1, "policy": 1}
    assert c4["documents_changed"] == 2
    kept = _read(tmp_path / "out" / "data")
    assert kept["edited"]["text"] == f"{sentences}\nThis cites a source ." and kept["clean"]["text"] == sentences
    originals = _read(tmp_path / "out" / "removed" / "c4_lines")  # the text before C4 changed it
    assert {i: (r["text"], r["reason"]) for i, r in originals.items()} == {
        i: (r["text"], "lines_dropped") for i, r in ((r["id"], r) for r in records) if i != "clean"}


def test_bench_data_curate_reports_both_worker_counts(tmp_path, capsys):
    """The throughput command runs the default spec with 2 and 1 workers on a generated corpus and reports both,
    with identical kept documents."""
    assert main(["bench-data", "curate", "--mb", "0.05", "--workers", "2,1", "--workdir", str(tmp_path / "b"),
                 "--json", str(tmp_path / "bench.json")]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["workers"], r["identical"]) for r in result["best"]] == [(2, True), (1, True)]
    best = result["best"][0]
    assert best["documents_in"] == result["planted"]["documents"] > best["documents_out"] > 0
    assert best["docs_per_s"] > 0 and best["mb_per_s"] > 0 and result["cpu"]
    assert "identical" in capsys.readouterr().out
