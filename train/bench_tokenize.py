"""`meshforge bench-data tokenize`: how fast the packed data cache is built with 1, 2, ... tokenizing processes.

A command, not a test: its figures belong to a machine and its load (issue 14's acceptance: 2 processes at least
1.6x faster than 1 on a ~50 MB corpus, on a 2-core machine, with byte-identical caches). It generates a corpus
(Shakespeare paragraphs drawn at random into documents of 1 to 8 paragraphs, as JSONL) or reads a given file,
fits the tokenizer and converts the corpus into `datasets`' Arrow cache first (neither is timed: every build reads
the same), then builds the cache with each `data.num_proc` in turn, as a run would (data/cache.py packed_rows),
and compares every file of each cache with the first one's (build.json, which records the seconds and processes
of a build, excepted). MB are megabytes (10^6) of document text in UTF-8. Beside the load average it reports what
share of the machine several processes get at that moment (`parallel_capacity`: n busy loops in n processes
against one), the ceiling of any speedup measured then.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data.cache import packed_rows
from data.config import SourceConfig
from data.sources import load_documents, read_text
from data.tokenize import SPECIALS, BPETokenizer, CharTokenizer, Tokenizer
from parallel.errors import UserError
from train.hardware import cpu_model, load_average

KEY = "--input"
BPE_TRAIN_BYTES = 8_000_000  # the BPE is fitted to this much of the corpus: enough merges, a few seconds


def write_corpus(path: Path, mb: float, seed: int = 0) -> None:
    """About `mb` MB of documents (JSONL, one `text` field) made of random tinyshakespeare paragraphs."""
    paragraphs = [p for p in read_text("builtin:tinyshakespeare.txt").split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    target, size = int(mb * 1e6), 0
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            picks = rng.integers(0, len(paragraphs), size=(256, 8))
            counts = rng.integers(1, 9, size=256)
            for row, n in zip(picks, counts):
                text = "\n\n".join(paragraphs[i] for i in row[:n])
                f.write(json.dumps({"text": text}) + "\n")
                size += len(text.encode())
                if size >= target:
                    break


def fit(kind: str, docs, vocab_size: int) -> Tokenizer:
    """The tokenizer the builds use (char: every character of the corpus; bpe: trained on its first 8 MB)."""
    if kind == "char":
        chars: set[str] = set()
        for batch in docs.iter(batch_size=4096):
            chars.update("".join(batch["text"]))
        return CharTokenizer.fit("".join(chars), SPECIALS)

    def head():
        seen = 0
        for batch in docs.iter(batch_size=1024):
            yield batch["text"]
            seen += sum(len(t) for t in batch["text"])
            if seen >= BPE_TRAIN_BYTES:
                return
    return BPETokenizer.train(head(), vocab_size)


BUSY_LOOP = "for i in range(20_000_000): pass"


def parallel_capacity(n: int) -> float:
    """How much faster n processes finish n equal busy loops than one process finishes one, times n (ideal n): the
    share of this machine a parallel build can get right now (other programs' load lowers it)."""
    def wall(k: int) -> float:
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(k)]
        for proc in procs:
            proc.wait()
        return time.perf_counter() - t0
    return round(n * wall(1) / wall(n), 2)


def cache_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of a cache but build.json (the build's own record: seconds, processes, builder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "build.json"}


def bench_tokenize(*, mb: float = 50.0, input_path: str = "", tokenizers: tuple[str, ...] = ("char", "bpe"),
                   num_procs: tuple[int, ...] = (1, 2), repeat: int = 1, pack_len: int = 512,
                   split_by: str = "paragraph", text_field: str = "text", vocab_size: int = 2048,
                   workdir: str = "") -> dict:
    """Build the cache of one corpus with each num_proc (best of `repeat`) and each tokenizer; the figures."""
    if repeat < 1 or pack_len < 1 or not num_procs or min(num_procs) < 1 or not mb > 0:
        raise UserError("--mb, --repeat, --pack-len and --num-proc: give positive numbers (e.g. --num-proc 1,2)")
    if input_path and not Path(input_path).expanduser().exists() and not any(c in input_path for c in "*?["):
        raise UserError(f"--input: {input_path}: no such file or folder; give a .txt/.jsonl/.parquet corpus, or "
                        "leave it out to generate one (--mb)")
    folder = Path(workdir).expanduser() if workdir else Path(tempfile.mkdtemp(prefix="meshforge-bench-tokenize-"))
    folder.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    try:
        if input_path:
            src = SourceConfig(input_path, split_by=split_by, text_field=text_field)
        else:
            corpus = folder / "corpus.jsonl"
            write_corpus(corpus, mb)
            src = SourceConfig(str(corpus))
        root = folder / "cache"
        docs = load_documents(KEY, src, root / "hf")  # the Arrow conversion every build then reuses
        text_bytes = sum(int(np.sum([len(t.encode()) for t in b["text"]])) for b in docs.iter(batch_size=4096))
        result = {"cpu": cpu_model(), "load_average_before": load_before,
                  "parallel_capacity": parallel_capacity(max(num_procs)), "corpus": input_path or "generated",
                  "corpus_mb": round(text_bytes / 1e6, 2), "documents": len(docs), "pack_len": pack_len,
                  "repeat": repeat, "runs": []}
        for kind in tokenizers:
            tok = fit(kind, docs, vocab_size)
            best: dict[int, float] = {}
            first_digest, meta = None, {}
            for _ in range(repeat):
                for n in num_procs:
                    shutil.rmtree(root / "packed", ignore_errors=True)
                    t0 = time.perf_counter()
                    _, _, meta = packed_rows(KEY, src, tok, pack_len, 0.1, root, num_proc=n)
                    seconds = time.perf_counter() - t0
                    best[n] = min(best.get(n, seconds), seconds)
                    digest = cache_digest(next((root / "packed").glob("*/tok-*")))
                    first_digest = first_digest or digest
                    result["runs"].append({"tokenizer": kind, "num_proc": n, "build_s": round(seconds, 3),
                                           "identical": digest == first_digest})
            tokens = meta["train_tokens"] + meta["val_tokens"]
            for n in num_procs:
                result.setdefault("best", []).append({
                    "tokenizer": kind, "vocab_size": tok.vocab_size, "num_proc": n, "build_s": round(best[n], 3),
                    "mb_per_s": round(text_bytes / 1e6 / best[n], 2), "docs_per_s": round(len(docs) / best[n]),
                    "tokens_per_s": round(tokens / best[n]), "speedup": round(best[num_procs[0]] / best[n], 2),
                    "identical": all(r["identical"] for r in result["runs"]
                                     if r["tokenizer"] == kind and r["num_proc"] == n)})
        result["load_average_after"] = load_average()
        return result
    finally:
        if not workdir:
            shutil.rmtree(folder, ignore_errors=True)


def format_result(result: dict) -> str:
    n = max(r["num_proc"] for r in result["best"])
    head = (f"CPU: {result['cpu']}; corpus: {result['corpus']}, {result['corpus_mb']} MB, {result['documents']:,} "
            f"documents; pack_len {result['pack_len']}; best of {result['repeat']}; load average "
            f"{result['load_average_before']} before, {result['load_average_after']} after; {n} busy loops ran "
            f"{result['parallel_capacity']}x as fast as one (the most {n} processes can reach now; ideal {n})")
    columns = ("tokenizer", "num_proc", "build_s", "mb_per_s", "docs_per_s", "tokens_per_s", "speedup", "identical")
    return "\n".join([head, *aligned(result["best"], columns)])


def aligned(records: list[dict], columns: tuple[str, ...]) -> list[str]:
    """A header line and one line per record, each column right-aligned (integers with thousands separators)."""
    rows = [[f"{r[c]:,}" if isinstance(r[c], int) and not isinstance(r[c], bool) else str(r[c]) for c in columns]
            for r in records]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    return ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
            *("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)]
