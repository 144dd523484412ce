"""Supervised fine-tuning examples: JSONL/Parquet rows -> rendered text pieces -> token ids with a loss mask.

A row is a prompt/response pair (data.prompt_field, data.response_field) or a chat (data.messages_field: a list
of {role, content}). It renders either with data.sft_template (a format string with {prompt}; the response
follows, then <eos>) or with the tokenizer's Jinja chat template (a prompt/response row becomes a user and an
assistant message). Rendering yields pieces (text, trained?); each piece is tokenized on its own, so a prompt
tokenizes exactly as it will at inference, where it is all the model is given.

Tokenized examples (one flat token stream, its loss mask and example offsets) are cached like packed rows:
    CACHE/sft/<source>-<hash of source + fields + template>/tok-<tokenizer fingerprint>/{tokens,loss,offsets}.npy
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data.cache import _slug, log
from data.chat import assistant_spans
from data.config import DataConfig, SourceConfig
from data.hashing import digest
from data.sources import BUILDERS, fingerprint as source_fingerprint, hf_datasets, resolve_files, source_kind
from data.tokenize import Tokenizer, fingerprint
from parallel.errors import UserError

VERSION = 1  # bump when the rendering or the cached format changes
PROGRESS_EVERY = 10_000  # examples between progress lines while tokenizing a large source
EOS = None  # a piece that is the end-of-sequence token itself (never tokenized from text)

Piece = tuple[str | None, bool]  # (text, or EOS; trained?)


@dataclasses.dataclass
class Examples:
    """Tokenized examples: example i is tokens[offsets[i]:offsets[i + 1]], trained where loss is True."""
    tokens: np.ndarray  # (total,) int32
    loss: np.ndarray  # (total,) bool
    offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, start: int, stop: int) -> "Examples":
        a, b = self.offsets[start], self.offsets[stop]
        return Examples(self.tokens[a:b], self.loss[a:b], self.offsets[start:stop + 1] - a)


# --- reading rows -----------------------------------------------------------------------------------------------

def _generated_rows(fn):
    for item in fn():
        if not isinstance(item, dict):
            raise UserError(f"data.path: an sft generator must yield dicts (prompt/response or messages), got "
                            f"{type(item).__name__}")
        yield item


def load_rows(key: str, src: SourceConfig, cfg: DataConfig, hf_cache: Path):
    """The source's rows as a `datasets.Dataset`, with the columns the sft fields name."""
    from data.sources import _generator_target  # a generator source: same resolution as the packed sources

    datasets = hf_datasets()
    try:
        if source_kind(src.path) == "generator":
            fn, _ = _generator_target(key, src.path)
            fp = digest(["sft", source_fingerprint(key, src)])
            ds = datasets.Dataset.from_generator(_generated_rows, cache_dir=str(hf_cache), fingerprint=fp,
                                                 gen_kwargs={"fn": fn})
        elif source_kind(src.path) == "synthetic":
            raise UserError(f"{key}.path: {src.path} is a synthetic task, not sft data")
        else:
            files = resolve_files(key, src.path)
            builder = BUILDERS[files[0].suffix.lower()]
            if builder == "text":
                raise UserError(f"{key}.path: data.objective 'sft' reads JSONL or Parquet rows (prompt/response or "
                                f"messages), not text files like {files[0].name}")
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                       cache_dir=str(hf_cache))
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        first = str(cause).splitlines()[0] if str(cause) else ""
        raise UserError(f"{key}.path: could not read {src.path}: {type(cause).__name__}: {first}") from None
    columns = set(ds.column_names)
    if cfg.messages_field not in columns and cfg.prompt_field not in columns:
        raise UserError(f"data.prompt_field: {src.path} has neither a {cfg.prompt_field!r} nor a "
                        f"{cfg.messages_field!r} field (its fields: {', '.join(sorted(columns))}); set "
                        "data.prompt_field / data.response_field or data.messages_field")
    if cfg.prompt_field in columns and cfg.response_field not in columns:
        raise UserError(f"data.response_field: {src.path} has no field {cfg.response_field!r} (its fields: "
                        f"{', '.join(sorted(columns))}); set data.response_field")
    if len(ds) < 2:
        raise UserError(f"{key}.path: {src.path} has {len(ds)} example(s), too few to split into train and "
                        "validation")
    keep = [c for c in (cfg.prompt_field, cfg.response_field, cfg.messages_field) if c in columns]
    return ds.select_columns(keep)


# --- rendering --------------------------------------------------------------------------------------------------

class Renderer:
    """One row -> pieces of (text or EOS, trained?), by data.sft_template or the tokenizer's chat template."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, path: str):
        self.cfg, self.path = cfg, path
        self.template = cfg.sft_template
        self.chat_template = getattr(tokenizer, "chat_template", "")
        self.special_tokens = getattr(tokenizer, "special_tokens", {})
        if not self.template and not self.chat_template:
            raise UserError("data.sft_template: the tokenizer has no chat template (data.tokenizer_path names no "
                            "HuggingFace folder with one); set data.sft_template, e.g. "
                            "'### Question:\\n{prompt}\\n### Answer:\\n'")

    def _text(self, row: dict, field: str, i: int) -> str:
        value = row.get(field)
        if not isinstance(value, str):
            what = "has no" if value is None else f"holds {type(value).__name__} in"
            raise UserError(f"data.{'prompt' if field == self.cfg.prompt_field else 'response'}_field: example {i} "
                            f"of {self.path} {what} field {field!r}; give every row a text {field!r}")
        return value

    def _messages(self, row: dict, i: int) -> list[dict]:
        messages = row.get(self.cfg.messages_field)
        if messages is None:
            return [{"role": "user", "content": self._text(row, self.cfg.prompt_field, i)},
                    {"role": "assistant", "content": self._text(row, self.cfg.response_field, i)}]
        out = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UserError(f"data.messages_field: example {i} of {self.path} has a message that is not "
                                f"{{role, content}} text: {str(m)[:80]}")
            out.append({k: v for k, v in m.items() if v is not None})  # Arrow fills keys other rows have with None
        if not any(m["role"] == "assistant" for m in out):
            roles = sorted({m["role"] for m in out})
            raise UserError(f"data.messages_field: example {i} of {self.path} has no assistant message (roles: "
                            f"{', '.join(roles) or 'none'}); sft trains on the assistant turns")
        return out

    def pieces(self, row: dict, i: int) -> list[Piece]:
        messages = self._messages(row, i)
        if not self.template:
            text, spans = assistant_spans(self.chat_template, messages, self.special_tokens)
            out, at = [], 0
            for a, b in spans:
                out += [(text[at:a], False), (text[a:b], True)]
                at = b
            return out + [(text[at:], False)]
        out = []
        for m in messages:  # format-string chats: every user turn is a prompt, every assistant turn an answer
            if m["role"] == "assistant":
                out += [(m["content"], True), (EOS, True)]
            elif m["role"] == "user":
                out.append((self.template.format(prompt=m["content"]), False))
            else:  # system (or tool) text is context: untrained, on its own line
                out.append((m["content"] + "\n", False))
        return out

    def texts(self, row: dict, i: int) -> str:
        """The example as one string (fitting a char/BPE tokenizer to the data)."""
        return "".join(t for t, _ in self.pieces(row, i) if t is not EOS)


def iter_rows(ds, batch_size: int = 1000) -> Iterator[tuple[int, dict]]:
    i = 0
    for batch in ds.iter(batch_size=batch_size):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield i, dict(zip(columns, values))
            i += 1


def n_val_examples(n: int, val_fraction: float) -> int:
    """The validation split: the last val_fraction of the examples, at least one, leaving one for training."""
    return min(n - 1, max(1, round(n * val_fraction)))


def example_texts(key: str, src: SourceConfig, cfg: DataConfig, hf_cache: Path,
                  train_only: bool = False) -> Iterator[list[str]]:
    """Batches of rendered examples (format-string template only: a fitted tokenizer has no chat template)."""
    if not cfg.sft_template:
        raise UserError("data.sft_template: a tokenizer fitted to the data has no chat template; set "
                        "data.sft_template, or give data.tokenizer_path a HuggingFace folder with a chat template")
    renderer = Renderer(cfg, None, src.path)
    ds = load_rows(key, src, cfg, hf_cache)
    if train_only:
        ds = ds.select(range(len(ds) - n_val_examples(len(ds), cfg.val_fraction)))
    batch = []
    for i, row in iter_rows(ds):
        batch.append(renderer.texts(row, i))
        if len(batch) == 1000:
            yield batch
            batch = []
    if batch:
        yield batch


# --- tokenizing -------------------------------------------------------------------------------------------------

def _tokenize(pieces: list[list[Piece]], tokenizer: Tokenizer, prefix: np.ndarray, eos: int):
    """Token ids and loss mask of each example's pieces, encoded piece by piece without added specials."""
    flat = [t for p in pieces for t, _ in p if t is not EOS]
    encoded = iter(tokenizer.encode_batch(flat, add_special_tokens=False))
    out = []
    for p in pieces:
        ids, loss = [prefix], [np.zeros(len(prefix), bool)]
        for text, trained in p:
            piece = np.array([eos], np.int32) if text is EOS else next(encoded)
            ids.append(piece)
            loss.append(np.full(len(piece), trained))
        out.append((np.concatenate(ids).astype(np.int32), np.concatenate(loss)))
    return out


def tokenize_rows(ds, cfg: DataConfig, tokenizer: Tokenizer, path: str) -> Examples:
    renderer = Renderer(cfg, tokenizer, path)
    eos = tokenizer.special_id("<eos>")
    # A format-string template is encoded as the sampler encodes a prompt: with the tokenizer's own leading
    # specials (Llama's BOS); a chat template writes them itself.
    prefix = tokenizer.encode("") if renderer.template else np.zeros(0, np.int32)
    tokens, loss, lengths = [], [], []
    n, t0 = len(ds), time.perf_counter()
    batch: list[list[Piece]] = []

    def flush():
        for ids, mask in _tokenize(batch, tokenizer, np.asarray(prefix, np.int32), eos):
            tokens.append(ids)
            loss.append(mask)
            lengths.append(len(ids))
        batch.clear()

    for i, row in iter_rows(ds):
        batch.append(renderer.pieces(row, i))
        if len(batch) == 1000:
            flush()
            if n > PROGRESS_EVERY and len(lengths) % PROGRESS_EVERY == 0:
                log(f"tokenized {len(lengths)}/{n} sft examples of {path} ({time.perf_counter() - t0:.0f}s)")
    flush()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Examples(np.concatenate(tokens).astype(np.int32), np.concatenate(loss).astype(bool), offsets)


def sft_examples(key: str, src: SourceConfig, cfg: DataConfig, tokenizer: Tokenizer,
                 root: Path) -> tuple[Examples, dict]:
    """(examples, meta) of an sft source: from the cache, or read, rendered, tokenized and cached now."""
    settings = {"version": VERSION, "source": source_fingerprint(key, src), "prompt_field": cfg.prompt_field,
                "response_field": cfg.response_field, "messages_field": cfg.messages_field,
                "sft_template": cfg.sft_template}
    tok_fp = fingerprint(tokenizer)  # covers the chat template and the special tokens
    source_dir = root / "sft" / f"{_slug(src.path)}-{digest(settings)}"
    final = source_dir / f"tok-{tok_fp}"
    names = ("tokens", "loss", "offsets")
    meta_path = final / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings and meta.get("tokenizer") == tok_fp:
            return Examples(*(np.load(final / f"{n}.npy", mmap_mode="r") for n in names)), meta
        shutil.rmtree(final, ignore_errors=True)
    t0 = time.perf_counter()
    ds = load_rows(key, src, cfg, root / "hf")
    if len(ds) > PROGRESS_EVERY:
        log(f"tokenizing {len(ds)} sft examples of {src.path}")
    examples = tokenize_rows(ds, cfg, tokenizer, src.path)
    meta = {"settings": settings, "tokenizer": tok_fp, "path": src.path, "examples": len(examples),
            "tokens": int(len(examples.tokens)), "trained_tokens": int(examples.loss.sum()),
            "build_s": round(time.perf_counter() - t0, 2)}
    tmp = source_dir / f".build-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        for n in names:
            np.save(tmp / f"{n}.npy", getattr(examples, n))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(final)
        except OSError:  # another process of the run finished the same build first: its copy is the same
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"cached {meta['examples']} sft examples of {src.path} ({meta['tokens']} tokens, {meta['trained_tokens']} "
         f"trained) in {meta['build_s']}s: {final}")
    return examples, meta
