"""Where text comes from: local files and folders (text, JSONL, Parquet), shipped corpora, Python generators,
HuggingFace hub datasets (`hf:NAMESPACE/NAME[/CONFIG][:SPLIT]`, through `datasets` and its cache: data/hub.py).

Files are read with HuggingFace `datasets` (its packaged `text`/`json`/`parquet` builders), so a corpus
larger than memory is an Arrow file on disk, not a Python list. Every loader returns a `datasets.Dataset` with
one column, `text`, one row per document. Synthetic tasks are sources too, but generated per row on demand
(data/synthetic.py). `datasets` is imported lazily: the windows pipeline (one text file) never pays for it.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data import hub
from data.config import SourceConfig
from parallel.errors import UserError

if TYPE_CHECKING:
    import datasets

BUILTIN_DIR = Path(__file__).parent / "corpora"
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# --- one text file (the windows pipeline) -----------------------------------------------------------------------

def resolve_path(path: str, key: str = "data.path") -> Path:
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        p = BUILTIN_DIR / name
        if not p.is_file():
            shipped = sorted(f.name for f in BUILTIN_DIR.glob("*.txt"))
            raise UserError(f"{key}: no built-in corpus {name!r}; shipped: {', '.join(shipped)}")
        return p
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key}: file not found: {path} (give an existing text file, or builtin:tinyshakespeare.txt)")
    return p


def read_text(path: str) -> str:
    p = resolve_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data.path: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise UserError(f"data.path: {path} is empty; give a file with text in it")
    return text


def text_splits(path: str, val_fraction: float, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the text, split into (train, validation): the validation split is the tail of the file."""
    ids = tokenizer.encode(read_text(path))
    n_val = int(len(ids) * val_fraction)
    if n_val < 2 or len(ids) - n_val < 2:
        raise UserError(f"data.path: {path} has only {len(ids)} tokens, too few to split into train and validation")
    return ids[:-n_val], ids[-n_val:]


# --- document sources (the packed pipeline) ---------------------------------------------------------------------

def source_kind(path: str) -> str:
    if hub.is_hub(path):
        return "hub"
    for kind in ("synthetic", "generator"):
        if path.startswith(kind + ":"):
            return kind
    return "files"


def resolve_files(key: str, path: str) -> list[Path]:
    """The files a file/folder/glob/builtin source names, sorted; all of one format."""
    if path.startswith("builtin:"):
        return [resolve_path(path, f"{key}.path")]
    if hub.is_hub(path):  # callers that read local files only (e.g. sft examples)
        raise UserError(f"{key}.path: {path} is a hub dataset, and this use reads local files only; save it as "
                        "JSONL or Parquet (datasets.load_dataset(...).to_json) and give that file")
    p = Path(path).expanduser()
    if p.is_dir() and (p / "stats.json").is_file() and (p / "data").is_dir():
        p = p / "data"  # a `meshforge curate` output: its kept documents, not removed/ or work/
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS)
        where = f"folder {path}"
    elif any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        where = f"pattern {path}"
    elif p.is_file():
        files, where = [p], path
    else:
        raise UserError(f"{key}.path: file or folder not found: {path}; give an existing file, folder or glob")
    if not files:
        raise UserError(f"{key}.path: {where} has no {'/'.join(sorted(BUILDERS))} files")
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lower() not in BUILDERS)
        raise UserError(f"{key}.path: {bad} is not a supported file type; use {', '.join(sorted(BUILDERS))}")
    if len(kinds) > 1:
        raise UserError(f"{key}.path: {where} mixes {' and '.join(sorted(kinds))} files; make one source per "
                        "format in data.sources")
    return files


@functools.lru_cache(maxsize=32)
def _exec_file(file: Path, resolved: Path, size: int, mtime_ns: int):
    """The module a generator file defines, run once per version of the file (the last three are the key)."""
    mod_spec = importlib.util.spec_from_file_location(f"meshforge_source_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    mod_spec.loader.exec_module(module)
    return module


def _generator_target(key: str, path: str):
    """`generator:pkg.module:function` or `generator:path/to/file.py:function` -> (function, defining file).

    A file is executed once per version, not at every look-up (fingerprints, tokenizer fitting, caching)."""
    spec = path.removeprefix("generator:")
    module_name, _, fn_name = spec.rpartition(":")
    if not module_name or not fn_name:
        raise UserError(f"{key}.path: write a generator source as generator:MODULE:FUNCTION or "
                        f"generator:FILE.py:FUNCTION, got {path!r}")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise UserError(f"{key}.path: generator file not found: {module_name}")
            st = file.stat()
            module = _exec_file(file, file.resolve(), st.st_size, st.st_mtime_ns)
            sys.modules[module.__name__] = module  # another file with this stem may have taken the name since
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{key}.path: cannot import {module_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"{key}.path: {module_name} has no function {fn_name!r}")
    return fn, Path(getattr(module, "__file__", "") or "")


def _stat(p: Path) -> list:
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(key: str, src: SourceConfig) -> dict:
    """What a source's documents depend on: its settings and its files' sizes and modification times (a hub
    dataset's repository, config, split and revision)."""
    fp = {"path": src.path, "split_by": src.split_by, "text_field": src.text_field}
    kind = source_kind(src.path)
    if kind == "hub":
        fp["hub"] = hub.fingerprint(key, src.path)
    elif kind == "files":
        fp["files"] = [_stat(f) for f in resolve_files(key, src.path)]
    elif kind == "generator":
        _, file = _generator_target(key, src.path)
        fp["files"] = [_stat(file)] if file.is_file() else []
    return fp


def hf_datasets():
    """HuggingFace `datasets`, imported on first use, quiet. Local files never reach the network; hub sources
    follow data.hf_offline (data/hub.py)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _generated_documents(fn, field: str):
    for item in fn():
        yield {"text": item if isinstance(item, str) else item[field]}


def check_field(key: str, src: SourceConfig, field: str, setting: str) -> None:
    """Refuse, before anything is read in full, a `field` that the source's records lack (the first record of
    its first file is checked: JSONL or Parquet; other sources have no fields)."""
    kind = source_kind(src.path)
    files = resolve_files(key, src.path) if kind == "files" else []
    suffix = files[0].suffix.lower() if files else ""
    if kind == "hub":
        names = hub.load(key, src.path).column_names
        if field not in names:
            raise UserError(f"{setting}: {field!r} is not a field of {key} ({src.path} has {', '.join(names)})")
        return
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(files[0]).names
    elif suffix == ".jsonl":
        with files[0].open(encoding="utf-8") as f:
            line = next((ln for ln in f if ln.strip()), "{}")
        try:
            names = list(json.loads(line))
        except (json.JSONDecodeError, TypeError):
            names = []
    elif suffix == ".json":
        return  # a JSON array: datasets reads it; load_documents checks the field
    else:
        raise UserError(f"{setting}: {field!r} is not a field of {key} ({src.path} has no records with fields); use "
                        "JSONL or Parquet sources, or partition by source")
    if field not in names:
        raise UserError(f"{setting}: {field!r} is not a field of {key} ({files[0].name} has {', '.join(names)})")


def load_documents(key: str, src: SourceConfig, hf_cache: Path, keep: tuple[str, ...] = ()) -> "datasets.Dataset":
    """All documents of a file or generator source, as a Dataset with a `text` column (and the `keep` fields of
    JSONL/Parquet records); empty ones dropped."""
    datasets = hf_datasets()
    kind = source_kind(src.path)
    if keep and (kind == "generator" or kind == "files" and
                 BUILDERS.get(resolve_files(key, src.path)[0].suffix.lower()) == "text"):
        raise UserError(f"{key}.path: {src.path} has no fields besides its text (looking for {keep[0]!r}); "
                        "fields come from JSONL or Parquet records")
    try:
        if kind == "generator":
            fn, _ = _generator_target(key, src.path)
            fp = hashlib.sha256(repr(fingerprint(key, src)).encode()).hexdigest()[:16]
            ds = datasets.Dataset.from_generator(_generated_documents, cache_dir=str(hf_cache), fingerprint=fp,
                                                 gen_kwargs={"fn": fn, "field": src.text_field})
            column = "text"
        elif kind == "hub":
            ds, column = hub.load(key, src.path), src.text_field
        else:
            files = resolve_files(key, src.path)
            builder = BUILDERS[files[0].suffix.lower()]
            extra = {"sample_by": src.split_by} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                       cache_dir=str(hf_cache), **extra)
            column = "text" if builder == "text" else src.text_field
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        if isinstance(cause, KeyError):
            raise UserError(f"{key}.text_field: an item of {src.path} has no field {src.text_field!r}; "
                            f"set {key}.text_field") from None
        first = str(cause).splitlines()[0] if str(cause) else ""
        raise UserError(f"{key}.path: could not read {src.path}: {type(cause).__name__}: {first}") from None
    if column not in ds.column_names:
        raise UserError(f"{key}.text_field: {src.path} has no column {column!r}; its columns: "
                        f"{', '.join(ds.column_names)}")
    if ds.features[column].dtype not in ("string", "large_string"):
        raise UserError(f"{key}.text_field: column {column!r} of {src.path} holds {ds.features[column]}, "
                        "not text; name the text column")
    missing = [k for k in keep if k not in ds.column_names]
    if missing:
        raise UserError(f"{key}.path: {src.path} has no field {missing[0]!r}; its fields: {', '.join(ds.column_names)}")
    ds = ds.select_columns([column, *keep])
    if column != "text":
        ds = ds.rename_column(column, "text")
    ds = ds.filter(lambda batch: [bool(t) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise UserError(f"{key}.path: {src.path} holds no text (no non-empty documents); give a corpus with text")
    return ds


def split_documents(ds: "datasets.Dataset", val_fraction: float, key: str) -> tuple:
    """(train, validation): the last fraction of the documents; of the text itself when there is one document."""
    datasets = hf_datasets()
    n = len(ds)
    if n == 1:
        text = ds[0]["text"]
        cut = int(len(text) * (1 - val_fraction))
        if cut < 1 or cut >= len(text):
            raise UserError(f"{key}.path: the corpus has only {len(text)} characters, too few to split into train "
                            "and validation")
        rest = {k: [ds[0][k]] for k in ds.column_names if k != "text"}
        return (datasets.Dataset.from_dict({"text": [text[:cut]], **rest}),
                datasets.Dataset.from_dict({"text": [text[cut:]], **rest}))
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return ds.select(range(n - n_val)), ds.select(range(n - n_val, n))
