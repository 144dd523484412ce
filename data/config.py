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

`tokenizer_path` may name a saved tokenizer JSON, a HuggingFace folder (tokenizer.json + tokenizer_config.json,
maybe config.json, chat_template.jinja) or that folder's tokenizer.json: the folder's eos token serves as <eos>,
its pad token (else eos) as <pad>, and its chat template is kept with the tokenizer.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Literal

SplitBy = Literal["document", "paragraph", "line"]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One source of a mixture (`data.sources`); a single source can be given as `data.path` instead.

    path: a file, a folder or a glob of .txt/.jsonl/.json/.parquet files; `builtin:NAME` (a corpus shipped
    here); `synthetic:TASK[?key=value&...]` (a generated task, see data/synthetic.py); or
    `generator:MODULE_OR_FILE.py:FUNCTION` (a Python generator yielding strings or dicts).
    """
    path: str
    weight: float = 1.0  # relative share of training rows drawn from this source
    split_by: SplitBy = "document"  # text files: a whole file, blank-line paragraphs, or lines are documents
    text_field: str = "text"  # JSONL/Parquet/generator dicts: the field holding the text


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
    cache_dir: str = ""  # tokenized, packed rows and tokenizers; "" = $MESHFORGE_CACHE or ~/.cache/meshforge
    prefetch: int = 4  # packed: batches prepared ahead in a background thread (0: none)
    eval_problems: int = 256  # synthetic tasks: held-out problems sampled for exact match at each eval
    synthetic_val_rows: int = 64  # synthetic tasks: held-out rows in the validation loss
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
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"data.mask_rate must be in (0, 1), got {self.mask_rate}")
        if self.span_mean < 1.0:
            raise ValueError(f"data.span_mean must be >= 1, got {self.span_mean}")
        for name in ("pack_len", "prefetch", "eval_problems", "synthetic_val_rows"):
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
        generated = self.path.startswith(("synthetic:", "generator:"))
        if self.mode == "windows" and (self.sources or self.objective != "causal" or generated):
            what = "data.sources" if self.sources else f"data.path {self.path!r}" if generated else \
                f"data.objective {self.objective!r}"
            raise ValueError(f"{what} needs data.mode 'packed' (windows mode reads one text file, causal only)")

    def source_list(self) -> tuple[tuple[str, SourceConfig], ...]:
        """(config key, source) pairs: the mixture, or `path` as the one source."""
        if self.sources:
            return tuple((f"data.sources[{i}]", s) for i, s in enumerate(self.sources))
        return (("data", SourceConfig(self.path, 1.0, self.split_by, self.text_field)),)
