"""The `data` config section: where text comes from, how it becomes token rows, and what the model learns from them.

Two modes. `windows` (the default) reads one text file and samples random windows from its token stream, as
nanoGPT does. `packed` reads documents through HuggingFace `datasets` (text/JSONL/Parquet files or folders,
Python generators, synthetic tasks, weighted mixtures), packs them into fixed-length rows with segment ids,
caches the rows on disk, and applies an objective (causal, masked, span corruption, or sft).

Supervised fine-tuning (`objective = "sft"`, packed mode; data/sft.py): each JSONL/Parquet row is one example,
either a prompt and a response (`prompt_field`, `response_field`) or a chat (`messages_field`: a list of
{role, content}). It is rendered by `sft_template`, a Python format string with `{prompt}` (e.g.
"### Question:\n{prompt}\n### Answer:\n"; the response follows, then <eos>), or, when that is empty, by the
tokenizer's own chat template (a HuggingFace folder in `tokenizer_path`; a prompt/response row becomes a user
and an assistant message). Only response tokens (each assistant turn's content and its end) are trained;
several examples are packed into each row of train.seq_len + 1 tokens with document masking, and an example
longer than a row is cut (counted, one warning). The validation split is the last `val_fraction` of the examples.

Validation: by default the last `val_fraction` of each source's documents. `val_sources` replaces that with whole
held-out sources (every document of each; e.g. one clean set for runs trained on raw and curated versions of a
corpus). With more than one validation source each evaluation also logs `val_loss_<name>` per source (names from
SourceConfig.name, else the path), while `val_loss` stays the token-weighted mean over all validation windows.
`val_max_tokens` caps what one evaluation reads (data/validation.py: each source's share in proportion to its
size, spread evenly over it).

`tokenizer_path` may name a saved tokenizer JSON, a HuggingFace folder (tokenizer.json + tokenizer_config.json,
maybe config.json, chat_template.jinja) or that folder's tokenizer.json: the folder's eos token serves as <eos>,
its pad token (else eos) as <pad>, and its chat template is kept with the tokenizer.
"""
from __future__ import annotations

import dataclasses
import re
import string
from typing import Literal

SplitBy = Literal["document", "paragraph", "line"]
NAME = re.compile(r"[A-Za-z0-9_-]+")  # what a source's name may hold: it becomes part of a metric key


def default_name(path: str) -> str:
    """A source's name from its path: a file's stem, a folder's name (a glob's last plain folder), a synthetic
    task's or a generator function's name, a hub dataset's name and config (builtin:tinyshakespeare.txt ->
    tinyshakespeare, synthetic:addition?digits=2 -> addition, hf:namespace/set/config:train -> set_config)."""
    if path.startswith("synthetic:"):
        base = path.removeprefix("synthetic:").split("?")[0]
    elif path.startswith("generator:"):
        base = path.rsplit(":", 1)[-1]
    elif path.startswith("hf:"):
        parts = path.removeprefix("hf:").split("?")[0].split(":")[0].split("/")
        base = "/".join(parts[1:] or parts)  # without the namespace
    else:
        parts = [p for p in path.removeprefix("builtin:").replace("\\", "/").split("/") if p and p != "**"]
        plain = [p for p in parts if not any(ch in p for ch in "*?[")]
        base = plain[-1] if plain else ""
        if plain and parts and base == parts[-1] and "." in base[1:]:
            base = base.rsplit(".", 1)[0]  # a file: its stem
    return "_".join(NAME.findall(base)).strip("_-") or "source"


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One source of a mixture (`data.sources`); a single source can be given as `data.path` instead.

    path: a file, a folder or a glob of .txt/.jsonl/.json/.parquet files; `builtin:NAME` (a corpus shipped
    here); `synthetic:TASK[?key=value&...]` (a generated task, see data/synthetic.py);
    `generator:MODULE_OR_FILE.py:FUNCTION` (a Python generator yielding strings or dicts); or a HuggingFace hub
    dataset, loaded through `datasets` and its cache (data/hub.py; `text_field` names its text column):

        hf:NAMESPACE/NAME[/CONFIG][:SPLIT]      e.g. hf:roneneldan/TinyStories (split train),
                                                hf:Salesforce/wikitext/wikitext-2-raw-v1:validation
        hf:NAME[:SPLIT]                         a legacy name without a namespace (no config: give the namespace)

    The first '/' separates namespace and name (hub names are NAMESPACE/NAME), a second one starts the config
    (omitted: the dataset's default or only config); the first ':' starts the split, default `train`, which may be
    a slice in datasets' syntax (`train[:10%]`). Offline mode is `data.hf_offline`. A `?streaming=1` suffix
    streams the split instead of preparing it on disk (corpora larger than the disk; data/stream.py): read in
    order, tokenized as training goes, resumable by position; it needs data.tokenizer byte or tokenizer_path.
    """
    path: str
    weight: float = 1.0  # relative share of training rows drawn from this source
    split_by: SplitBy = "document"  # text files: a whole file, blank-line paragraphs, or lines are documents
    text_field: str = "text"  # JSONL/Parquet/generator dicts: the field holding the text
    name: str = ""  # its metric keys' suffix (val_loss_<name>); "": from the path (default_name)

    def resolved_name(self) -> str:
        return self.name or default_name(self.path)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = "builtin:tinyshakespeare.txt"  # the one source when `sources` is empty (see SourceConfig.path)
    sources: tuple[SourceConfig, ...] = ()  # a weighted mixture; overrides `path`
    mode: Literal["windows", "packed"] = "windows"  # windows: random windows of one text file (nanoGPT)
    split_by: SplitBy = "document"  # for `path` (see SourceConfig)
    text_field: str = "text"  # for `path` (see SourceConfig)
    tokenizer: Literal["char", "byte", "bpe"] = "char"
    # use this saved tokenizer instead of building one: ours, a HF tokenizers JSON, or a HF tokenizer folder
    tokenizer_path: str = ""
    bpe_vocab_size: int = 2048
    objective: Literal["causal", "masked", "span", "sft"] = "causal"
    mask_rate: float = 0.15  # masked: fraction of tokens predicted; span: fraction of tokens corrupted
    span_mean: float = 3.0  # span: mean corrupted-span length
    loss_on_prompt: bool = False  # synthetic tasks: also train on predicting the prompt, not just the answer
    pack_len: int = 0  # length the cache is packed for (0: train.seq_len); a shorter seq_len splits its rows
    shuffle: bool = True  # a fresh permutation of the rows each epoch
    val_fraction: float = 0.1  # the last fraction of each source's documents (of the text, for one document)
    # Validate on these sources instead (packed mode): all documents of each; `weight` is not used.
    val_sources: tuple[SourceConfig, ...] = ()
    # At most this many tokens per evaluation (0: all), as windows of train.seq_len shared by the sources in
    # proportion to their validation windows (at least one each) and spread evenly over each source, so the loss
    # stays an estimate of the whole split's. train.eval_batches instead stops after the first N batches: those
    # hold the first sources' windows only.
    val_max_tokens: int = 0
    cache_dir: str = ""  # tokenized, packed rows and tokenizers; "" = $MESHFORGE_CACHE or ~/.cache/meshforge
    # processes that tokenize a source into the cache (0: every local core; 1: one); the cached rows are the same
    # whatever it is, and a multi-host run builds them on one process per cache folder (data/build_once.py)
    num_proc: int = 0
    # hf: sources from HuggingFace's cache only, never the network (HF_HUB_OFFLINE=1 in the environment also does
    # this). False: hub names download as `datasets` does, and a cached dataset still loads when the hub is down.
    hf_offline: bool = False
    prefetch: int = 4  # packed: batches prepared ahead in a background thread (0: none)
    eval_problems: int = 256  # synthetic tasks: held-out problems sampled for exact match at each eval
    synthetic_val_rows: int = 64  # synthetic tasks and streamed hub sources: held-out rows in the validation loss
    # sft (see the module docstring): where a row keeps its prompt, response or chat, and how it is rendered
    prompt_field: str = "prompt"  # sft: prompt/response rows: the prompt text
    response_field: str = "response"  # sft: prompt/response rows: the text to train on
    messages_field: str = "messages"  # sft: chat rows: a list of {role, content} (used when a row has it)
    sft_template: str = ""  # sft: format string with {prompt}, e.g. "Q: {prompt}\nA: "; "": the chat template

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        for i, s in enumerate(self.sources):
            if not isinstance(s, SourceConfig):
                raise ValueError(f"data.sources[{i}] must be a SourceConfig, got {type(s).__name__}")
            if not s.weight > 0:
                raise ValueError(f"data.sources[{i}].weight must be > 0, got {s.weight}; give every source of "
                                 "a mixture a positive weight (or remove it)")
        for field in ("sources", "val_sources"):
            check_names(field, getattr(self, field))
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"data.mask_rate must be in (0, 1), got {self.mask_rate}")
        if self.span_mean < 1.0:
            raise ValueError(f"data.span_mean must be >= 1, got {self.span_mean}")
        for name in ("pack_len", "prefetch", "eval_problems", "synthetic_val_rows", "val_max_tokens",
                     "num_proc"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.bpe_vocab_size < 300:
            raise ValueError(f"data.bpe_vocab_size must be >= 300 (256 bytes + special tokens), "
                             f"got {self.bpe_vocab_size}")
        if self.sft_template:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.sft_template) if f is not None}
            except ValueError:
                fields = set()
            if fields != {"prompt"}:
                raise ValueError(f"data.sft_template must be a format string whose only field is {{prompt}} "
                                 f"(write literal braces as {{{{ }}}}), got {self.sft_template!r}")
        generated = self.path.startswith(("synthetic:", "generator:", "hf:"))
        if self.mode == "windows" and (self.sources or self.objective != "causal" or generated):
            what = "data.sources" if self.sources else f"data.path {self.path!r}" if generated else \
                f"data.objective {self.objective!r}"
            raise ValueError(f"{what} needs data.mode 'packed' (windows mode reads one text file, causal only)")
        if self.mode == "windows" and self.val_sources:
            raise ValueError("data.val_sources needs data.mode 'packed'; set --data.mode packed (windows mode "
                             "validates on the tail of its one text file)")

    def source_list(self) -> tuple[tuple[str, SourceConfig], ...]:
        """(config key, source) pairs: the mixture, or `path` as the one source."""
        if self.sources:
            return tuple((f"data.sources[{i}]", s) for i, s in enumerate(self.sources))
        return (("data", SourceConfig(self.path, 1.0, self.split_by, self.text_field)),)

    def val_source_list(self) -> tuple[tuple[str, SourceConfig], ...]:
        """(config key, source) pairs of `val_sources` (empty: validation reads each training source's tail)."""
        return tuple((f"data.val_sources[{i}]", s) for i, s in enumerate(self.val_sources))


def check_names(field: str, sources: tuple) -> None:
    """Names are metric-key suffixes: letters, digits, _ and -, and unique within the field."""
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        if not isinstance(s, SourceConfig):
            raise ValueError(f"data.{field}[{i}] must be a SourceConfig, got {type(s).__name__}")
        if s.name and not NAME.fullmatch(s.name):
            raise ValueError(f"data.{field}[{i}].name: {s.name!r} is not a name; use letters, digits, _ and -")
        name = s.resolved_name()
        if name in seen:
            j = seen[name]
            raise ValueError(f"data.{field}[{i}].name: data.{field}[{j}] ({sources[j].path}) and data.{field}[{i}] "
                             f"({s.path}) are both named {name!r}; give one of them another name")
        seen[name] = i
