"""`meshforge bench-data curate`: documents/s and MB/s of a whole curation, with 2 workers and with 1, in one run.

A command, not a test: its figures belong to a machine and its load (issue 14: the default pipeline on this
2-core machine for a ~100 MB JSONL corpus, and the same with 1 worker, side by side). It generates a corpus of
web-page-sized documents (random tinyshakespeare speeches, 150+ words each) with the problems a curation is for
planted at fixed rates (exact copies, near copies at shingle Jaccard 0.85-0.95, documents carrying PII, and an
evaluation set some documents contain), or reads a given JSONL file, then runs the spec (default
experiments/curate_default.py, every stage) once per worker count, alternating when repeated, with the same
`run.tasks`, and checks that the kept documents are byte-identical across worker counts. MB are 10^6 bytes of
the input file. The first local run starts datatrove's process pool; that start is taken out of the timings.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from parallel.errors import UserError
from train.bench_tokenize import aligned
from train.hardware import cpu_model, load_average

DEFAULT_SPEC = str(Path(__file__).resolve().parents[1] / "experiments" / "curate_default.py")
RATES = {"exact": 0.03, "near": 0.03, "pii": 0.03, "eval": 0.005}  # shares of the base documents


def write_corpus(path: Path, mb: float, seed: int = 0) -> dict:
    """About `mb` MB of JSONL documents with planted problems; path.eval.jsonl holds the evaluation passages.
    Returns the counts planted."""
    from data.curate.demo import near_copy, pii_items, pii_sentence, shakespeare_documents

    rng = random.Random(seed)
    speeches = [p.strip() for p in "\n\n".join(shakespeare_documents(0)).split("\n\n") if p.strip()]
    vocab = sorted({w for s in speeches for w in s.split() if w.isalpha() and w.islower()})
    target, size, n = int(mb * 1e6), 0, 0
    counts = dict.fromkeys(RATES, 0)
    evals = []
    with path.open("w", encoding="utf-8") as f:
        def put(text: str, kind: str) -> None:
            nonlocal size, n
            line = json.dumps({"id": f"{kind}-{n:07d}", "text": text}) + "\n"
            f.write(line)
            size, n = size + len(line.encode()), n + 1

        while size < target:
            parts: list[str] = []
            while sum(len(p.split()) for p in parts) < 150:
                parts.append(rng.choice(speeches))
            text = "\n\n".join(parts)
            draw = rng.random()
            if draw < RATES["pii"]:
                text += "\n\n" + pii_sentence(pii_items(rng))
                counts["pii"] += 1
            put(text, "doc")
            if rng.random() < RATES["exact"]:
                put(text.upper(), "exact")
                counts["exact"] += 1
            if rng.random() < RATES["near"]:
                put(near_copy(text, rng, vocab, 0.85, 0.95)[0], "near")
                counts["near"] += 1
            if rng.random() < RATES["eval"]:
                words = text.split()
                k = rng.randint(0, max(0, len(words) - 30))
                evals.append({"text": " ".join(words[k:k + 25])})
                counts["eval"] += 1
    with path.with_suffix(".eval.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in evals)
    return {"documents": n, **counts}


def data_digest(folder: Path) -> str:
    """One sha256 over the kept documents' shards (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted((folder / "data").rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def bench_curate(*, mb: float = 100.0, input_path: str = "", spec: str = DEFAULT_SPEC, workers: tuple[int, ...] = (2, 1),
                 repeat: int = 1, workdir: str = "", overrides: dict | None = None) -> dict:
    """Curate one corpus with each worker count (best of `repeat`); the figures."""
    from data.curate import curate
    from data.curate.executors import start_fork_server
    from data.curate.spec import apply_overrides, check_extra, load_spec

    check_extra()
    if repeat < 1 or not workers or min(workers) < 1 or not mb > 0:
        raise UserError("--mb, --repeat and --workers: give positive numbers (e.g. --workers 2,1)")
    if input_path and not Path(input_path).expanduser().is_file():
        raise UserError(f"--input: {input_path}: no such file; give a JSONL corpus, or leave it out to generate one")
    folder = Path(workdir).expanduser() if workdir else Path(tempfile.mkdtemp(prefix="meshforge-bench-curate-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        planted: dict = {}
        if input_path:
            corpus = Path(input_path).expanduser()
            eval_path = ""
        else:
            corpus = folder / "corpus.jsonl"
            t0 = time.perf_counter()
            print(f"meshforge: writing a {mb:g} MB corpus to {corpus}", flush=True)
            planted = write_corpus(corpus, mb)
            print(f"meshforge: wrote {planted['documents']:,} documents in {time.perf_counter() - t0:.0f} s", flush=True)
            eval_path = str(corpus.with_suffix(".eval.jsonl"))
        base = apply_overrides(load_spec(spec), {"input.path": str(corpus), **(overrides or {}),
                                                 **({"decontaminate.eval_path": eval_path} if eval_path else {})})
        corpus_mb = corpus.stat().st_size / 1e6
        start_fork_server()
        result = {"cpu": cpu_model(), "load_average_before": load_average(), "spec": spec, "stages": list(base.stages),
                  "tasks": base.run.tasks, "corpus": input_path or "generated", "corpus_mb": round(corpus_mb, 2),
                  "planted": planted, "repeat": repeat, "runs": []}
        best: dict[int, dict] = {}
        digests: dict[int, str] = {}
        for _ in range(repeat):
            for w in workers:
                out = folder / f"out-{w}"
                cfg = apply_overrides(base, {"output.path": str(out), "run.workers": w})
                t0 = time.perf_counter()
                stats = curate(cfg, overwrite=True)
                seconds = time.perf_counter() - t0
                s = stats["summary"]
                digests[w] = data_digest(out)
                run = {"workers": w, "seconds": round(seconds, 2), "documents_in": s["documents_in"],
                       "documents_out": s["documents_out"], "docs_per_s": round(s["documents_in"] / seconds, 1),
                       "mb_per_s": round(corpus_mb / seconds, 3),
                       "stage_seconds": {st["stage"]: st.get("seconds") for st in stats.get("stages", [])
                                         if isinstance(st, dict) and "stage" in st}}
                result["runs"].append(run)
                print(f"meshforge: {w} worker(s): {seconds:.1f} s", flush=True)
                if w not in best or seconds < best[w]["seconds"]:
                    best[w] = run
        first = workers[0]
        result["best"] = [{**best[w], "vs_first": round(best[w]["seconds"] / best[first]["seconds"], 2),
                           "identical": digests[w] == digests[first]} for w in workers]
        result["load_average_after"] = load_average()
        return result
    finally:
        if not workdir:
            shutil.rmtree(folder, ignore_errors=True)


def format_result(result: dict) -> str:
    head = (f"CPU: {result['cpu']}; corpus: {result['corpus']}, {result['corpus_mb']} MB; stages: "
            f"{', '.join(result['stages'])}; {result['tasks']} tasks; best of {result['repeat']}; load average "
            f"{result['load_average_before']} before, {result['load_average_after']} after")
    if result["planted"]:
        p = result["planted"]
        head += (f"\nplanted: {p['documents']:,} documents, {p['exact']} exact and {p['near']} near copies, "
                 f"{p['pii']} with PII, {p['eval']} evaluation passages")
    columns = ("workers", "seconds", "documents_in", "documents_out", "docs_per_s", "mb_per_s", "vs_first", "identical")
    return "\n".join([head, *aligned(result["best"], columns)])
