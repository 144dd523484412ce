"""Reading the corpus into shards, and the writers of shards, removed documents and the kept output.

The input is split into `run.tasks` shards by byte ranges (a record belongs to the task whose range holds its first
byte), so one large JSONL file is read by all tasks at once and the split depends on the spec, never on the number
of workers. From then on every stage reads shard `<rank>.jsonl` of the stage before it: datatrove's dedup stages
number documents by their position in a task's input, so the signature pass and the filter pass must see the same
documents in the same order, and this keeps them aligned. Records are flat, `{"id", "text"}` (removed ones add
`reason`): `datasets` reads JSONL with one schema.
"""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.readers.base import BaseReader
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

SHARD = "${rank}.jsonl"  # datatrove pads the rank to 5 digits
COMPRESSED = (".gz",)


def shard_name(rank: int) -> str:
    return f"{rank:05d}.jsonl"


def _count_newlines(f, end: int) -> int:
    f.seek(0)
    n, left = 0, end
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        n += chunk.count(b"\n")
        left -= len(chunk)
    return n


class JsonlRangeReader(BaseReader):
    """Reads this task's byte range of the input JSONL files. Compressed files cannot be split: each goes whole to
    the task whose range holds its first byte. Empty lines are skipped; lines that are not JSON objects, or lack
    text, are counted (stats.json `input.skipped`) and skipped."""

    name = "🐿 meshforge input"

    def __init__(self, files: list[tuple[str, int]], root: str, text_key: str, id_key: str, skipped_folder: str):
        super().__init__(text_key=text_key, id_key=id_key)
        self.files = files  # (absolute path, size in bytes)
        self.root = root
        self.skipped_folder = skipped_folder

    def _records(self, path: str, lo: int, hi: int, whole: bool):
        """(line number, bytes) of the lines that start in [lo, hi) of the file (all of it when whole)."""
        if whole:
            with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
                yield from enumerate(f)
            return
        with open(path, "rb") as f:
            if lo > 0:
                f.seek(lo - 1)
                if f.read(1) != b"\n":
                    f.readline()  # the line in progress belongs to the task before
            pos = f.tell()
            line_no = _count_newlines(f, pos) if pos else 0
            f.seek(pos)
            while pos < hi:
                line = f.readline()
                if not line:
                    break
                yield line_no, line
                line_no += 1
                pos += len(line)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import orjson

        total = sum(size for _, size in self.files)
        lo, hi = total * rank // world_size, total * (rank + 1) // world_size
        skipped: Counter = Counter()
        start = 0
        for path, size in self.files:
            end = start + size
            whole = path.endswith(COMPRESSED)
            if whole and lo <= start < hi or not whole and start < hi and lo < end:
                rel = str(Path(path).relative_to(self.root)) if path.startswith(self.root) else Path(path).name
                for line_no, line in self._records(path, max(lo, start) - start, min(hi, end) - start, whole):
                    if not line.strip():
                        continue
                    with self.track_time():
                        try:
                            record = orjson.loads(line)
                        except orjson.JSONDecodeError:
                            record = None
                        if not isinstance(record, dict):
                            skipped["not_a_json_object"] += 1
                            continue
                        text = record.get(self.text_key)
                        if not isinstance(text, str) or not text:
                            skipped["no_text"] += 1
                            continue
                        given = record.get(self.id_key)
                        doc = Document(text=text, id=str(given) if given is not None else f"{rel}:{line_no + 1}")
                    self.update_doc_stats(doc)
                    yield doc
            start = end
        with get_datafolder(self.skipped_folder).open(f"skipped_{rank:05d}.json", "w") as f:
            json.dump(dict(skipped), f)


class ShardReader(JsonlReader):
    """Reads shard `<rank>.jsonl` of a stage's output: task r of the next stage continues task r's documents."""

    name = "🐿 meshforge shard"

    def __init__(self, folder: str):
        super().__init__(folder, compression=None, add_file_path=False)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        name = shard_name(rank)
        if self.data_folder.isfile(name):  # a task whose documents were all removed wrote no shard
            for doc in self.read_files_shard([name]):
                doc.metadata.clear()
                doc.metadata["shard"] = rank  # exact dedup keeps the copy from the earliest shard (text.py)
                yield doc


def id_text(writer, doc: Document) -> dict:
    """The record every shard holds (a writer adapter: datatrove binds it to the writer)."""
    return {"id": doc.id, "text": doc.text}


def removed_record(writer, doc: Document) -> dict:
    return {"id": doc.id, "text": doc.text, "reason": doc.metadata.get("filter_reason") or writer.reason}


def originals_writer(folder: str) -> JsonlWriter:
    """Writes, to <folder>/<rank>.jsonl, the text a kept document had before its stage changed it, with the reason
    (the document's filter_reason); not counted as removed."""
    writer = JsonlWriter(folder, output_filename=SHARD, compression=None, adapter=removed_record)
    writer.reason = "text_changed"
    return writer


def shard_writer(folder: str) -> JsonlWriter:
    return JsonlWriter(folder, output_filename=SHARD, compression=None, adapter=id_text)


def output_writer(folder: str, fmt: str):
    """The writer of the kept documents, DIR/data/<rank>.jsonl or .parquet."""
    if fmt == "parquet":
        import pyarrow as pa

        schema = pa.schema([("id", pa.string()), ("text", pa.string())])
        return ParquetWriter(folder, output_filename="${rank}.parquet", adapter=id_text, schema=schema,
                             max_file_size=-1)
    return shard_writer(folder)


class RemovedWriter(JsonlWriter):
    """Writes a stage's removed documents to DIR/removed/<stage>/<rank>.jsonl with their reason (datatrove's
    filter_reason, else the stage's own), and the task's count per reason to its stats folder."""

    name = "🗑 meshforge removed"

    def __init__(self, folder: str, counts_folder: str, reason: str):
        super().__init__(folder, output_filename=SHARD, compression=None, adapter=removed_record)
        self.reason = reason
        self.counts_folder = counts_folder
        self._counts: Counter = Counter()
        self._rank: int | None = None

    def write(self, document: Document, rank: int = 0, **kwargs):
        self._rank = rank
        self._counts[document.metadata.get("filter_reason") or self.reason] += 1
        super().write(document, rank, **kwargs)

    def close(self):
        super().close()
        if self._rank is not None:
            with get_datafolder(self.counts_folder).open(f"removed_{self._rank:05d}.json", "w") as f:
                json.dump(dict(self._counts), f)
