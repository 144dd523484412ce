"""The curation spec: typed, frozen sections, command-line overrides, validation, spec-file loading.

A spec file is a Python file whose `get_config()` returns a `CurateConfig`, as an experiment file returns a train
config. Every key can be overridden from the command line as `--section.key VALUE`; unknown keys and wrong types
are refused in one line naming the allowed keys. This module imports neither datatrove nor the rest of meshforge
(data/ never imports train/, so the override parsing mirrors train/config.py's rather than importing it).

MinHash, bands, rows and the Jaccard threshold. MinHash LSH hashes every document's word n-grams with `num_hashes`
hash functions and splits the signature into `bands` bands of `rows` hashes each (datatrove calls them
num_buckets and hashes_per_bucket, so bands x rows must equal num_hashes). Two documents become a duplicate pair
when all rows of at least one band agree. For a pair whose n-gram sets have Jaccard similarity s, one band agrees
with probability s**rows, so the pair is caught with probability

    P(s) = 1 - (1 - s**rows) ** bands,

an S-shaped curve in s whose steepest rise sits near t = (1 / bands) ** (1 / rows): pairs well above t are almost
always caught, pairs well below almost never. `minhash.threshold` is that t. With bands = rows = 0 (the default)
the pair of divisors of num_hashes whose t is closest to the threshold is taken: for 120 hashes and 0.8 that is
12 bands x 10 rows (t = 0.78), which catches a pair at s = 0.9 with probability 0.994, at 0.85 0.93, at 0.8 0.74,
at 0.7 0.29, at 0.6 0.07 and at 0.5 0.012. (datatrove's own default, 14 x 8, has t = 0.72: P(0.7) = 0.56.)
Given explicitly, bands and rows must multiply to num_hashes and put t within 0.05 of the threshold, so that a spec
never says one threshold and runs another. A detected pair is not verified against its full signature: precision
comes from the curve alone (see stats.json's `minhash.catch_probability`).

What holds at which similarity (the default 12 x 10, measured in tests/test_curate.py on random-word documents
with 100 planted near duplicates at 0.87-0.95, 60 negatives at 0.45-0.50 and 60 at 0.68-0.75): recall >= 0.95 on
pairs at >= 0.85 (measured 1.00), with precision >= 0.95 against negatives at <= 0.5 (measured 1.00, none
caught). Negatives just under the threshold are caught as the curve says, not refused: 24 of the 60 at 0.68-0.75
(20.7 expected), so precision with them counted is 0.81. That is the documented price of LSH without
verification, not a setting to fix: the banding is picked for threshold 0.8, and no banding of a practical number
of hashes tells 0.75 from 0.85 at 95%/95% (catching >= 95% of pairs at 0.85 and <= 5% at 0.75 takes ~21,000
hashes). Catching >= 95% at 0.85 and <= 5% at 0.6 takes 240: --minhash.num_hashes 240 --minhash.threshold 0.78
(20 x 12). Each removed document is in DIR/removed/minhash_dedup/, to check a pair's similarity.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from parallel.errors import UserError
from parallel.overrides import field_types
from parallel.overrides import parse_value as shared_parse_value


@dataclasses.dataclass(frozen=True)
class InputConfig:
    path: str = ""  # a JSONL file (.jsonl, .json, .jsonl.gz), a folder of them, or a glob; --input sets it
    text_field: str = "text"
    id_field: str = "id"  # records without it get "<file>:<line>" (the file relative to the input folder)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    path: str = ""  # the curation folder; --output sets it
    format: Literal["jsonl", "parquet"] = "jsonl"  # of the kept documents' shards under DIR/data/


@dataclasses.dataclass(frozen=True)
class RunConfig:
    executor: Literal["local", "slurm", "ray"] = "local"
    # Shards the corpus is split into. Fixed by the spec, not by the machine, so that results do not depend on how
    # many workers run them: the same tasks give the same output on 1 worker, 16 cores or a cluster.
    tasks: int = 8
    workers: int = 0  # tasks run at once; 0: all cores (local), no limit (slurm, ray)
    keep_work: bool = False  # keep DIR/work/'s intermediate shards and signatures after a finished curation


@dataclasses.dataclass(frozen=True)
class SlurmConfig:
    partition: str = ""  # required with run.executor slurm
    time: str = "04:00:00"  # per job
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    qos: str = "normal"
    job_name: str = "meshforge-curate"
    env_command: str = ""  # run before each job, e.g. "source ~/venv/bin/activate" (meshforge must import there)


@dataclasses.dataclass(frozen=True)
class RayConfig:
    address: str = ""  # a running cluster ("auto", "ray://host:10001"); "" starts a local Ray as ray.init() does
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0


@dataclasses.dataclass(frozen=True)
class ExactDedupConfig:
    # Of identical documents the first in input order is kept. Identical: equal after lowercasing, turning
    # punctuation into spaces and collapsing whitespace (datatrove's simplify_text, numbers kept as they are);
    # false: equal byte for byte.
    normalize: bool = True


@dataclasses.dataclass(frozen=True)
class MinhashConfig:
    n_grams: int = 5  # words per shingle (after simplify_text: lowercase, no punctuation)
    num_hashes: int = 120
    bands: int = 0  # 0: chosen from threshold and num_hashes (see the module docstring)
    rows: int = 0
    threshold: float = 0.8  # the Jaccard similarity where the LSH S-curve rises: (1/bands)**(1/rows)
    seed: int = 1


@dataclasses.dataclass(frozen=True)
class GopherQualityConfig:
    """Gopher's quality rules (Rae et al. 2021, datatrove's GopherQualityFilter); 0 turns a rule off. Words are
    spaCy tokens, punctuation marks included."""
    min_doc_words: int = 50
    max_doc_words: int = 100000
    min_avg_word_length: int = 3
    max_avg_word_length: int = 10
    max_symbol_word_ratio: float = 0.1  # '#' or ellipses per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # share of words with a letter (datatrove: max_non_alpha_words_ratio)
    min_stop_words: int = 2


@dataclasses.dataclass(frozen=True)
class GopherRepetitionConfig:
    """Gopher's repetition rules (datatrove's GopherRepetitionFilter); 0 turns a rule off."""
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    # (n, max share of characters in the most frequent n-gram); on the command line "2:0.2,3:0.18,4:0.16"
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    # (n, max share of characters in repeated n-grams)
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                                   (10, 0.10))


@dataclasses.dataclass(frozen=True)
class C4Config:
    """C4's rules (Raffel et al. 2020, datatrove's C4QualityFilter). Line rules drop lines and keep the document
    (its text changed: stats.json counts c4's `lines_dropped` per rule and `documents_changed`, and the text before
    goes to DIR/removed/c4_lines/); document rules drop it. -1 turns a count rule off."""
    split_paragraph: bool = True  # lines are "\n"-separated; false: spaCy sentences instead
    remove_citations: bool = True  # strip Wikipedia-style [1], [edit], [citation needed]
    filter_no_terminal_punct: bool = True  # drop lines not ending in . ! ? " ' (verse and dialogue lose most lines)
    min_num_sentences: int = 5  # documents with fewer sentences left are dropped
    min_words_per_line: int = 3
    max_word_length: int = 1000  # lines with a longer word are dropped
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True  # lines mentioning javascript
    filter_curly_bracket: bool = True  # documents with a '{' (code)
    filter_policy: bool = True  # lines about cookies, terms of use, privacy policy


@dataclasses.dataclass(frozen=True)
class PIIConfig:
    """Replaced by <EMAIL>, <IP>, <PHONE>, <CARD> in the documents' text (stats.json counts pii's `replaced` per
    kind and `documents_changed`; run.keep_work keeps the text before, in DIR/work/shards/). E-mails and IPs by
    datatrove's PIIFormatter; phones by Google's libphonenumber (the `phonenumbers` package, numbers valid in
    `phone_region` or written with +country); cards: 13-19 digits, grouped by spaces or dashes, that pass the Luhn
    check, found also next to other digit groups (others stay untouched; data/curate/pii.py has the rules)."""
    emails: bool = True
    ips: bool = True
    only_public_ips: bool = True  # private, loopback and reserved addresses are not personal
    phones: bool = True
    phone_region: str = "US"  # how numbers without +country are read (ISO 3166 code)
    cards: bool = True


@dataclasses.dataclass(frozen=True)
class DecontaminateConfig:
    """Drop every document that shares a word n-gram with the evaluation set (words after lowercasing and turning
    punctuation into spaces). Evaluation files: JSONL records (their text_field) or plain text files (one text
    each); evaluation texts shorter than n words contribute nothing. Empty eval_path: the stage passes everything
    and says so."""
    eval_path: str = ""  # a file, folder or glob
    text_field: str = "text"
    n: int = 13


# Stage name -> the spec section holding its settings. Deduplication stages are named with "dedup".
STAGES: dict[str, str] = {
    "exact_dedup": "exact_dedup",
    "minhash_dedup": "minhash",
    "gopher_repetition": "gopher_repetition",
    "gopher_quality": "gopher_quality",
    "c4": "c4",
    "decontaminate": "decontaminate",
    "pii": "pii",
}


@dataclasses.dataclass(frozen=True)
class CurateConfig:
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    run: RunConfig = RunConfig()
    slurm: SlurmConfig = SlurmConfig()
    ray: RayConfig = RayConfig()
    # The stages to run, in order (each one's section below holds its settings); on the command line
    # --stages exact_dedup,minhash_dedup,pii
    stages: tuple[str, ...] = tuple(STAGES)
    exact_dedup: ExactDedupConfig = ExactDedupConfig()
    minhash: MinhashConfig = MinhashConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    c4: C4Config = C4Config()
    pii: PIIConfig = PIIConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    name: str = "curate"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(CurateConfig) if f.name not in ("stages", "name"))


# --- overrides ----------------------------------------------------------------------------------------------------

def _fail(key: str, message: str) -> typing.NoReturn:
    raise UserError(f"--{key}: {message}")


def parse_value(key: str, raw: Any, tp: Any) -> Any:
    """The shared parser (parallel/overrides.py), plus the spec's one type of its own: ((n, share), ...) pairs."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and args and typing.get_origin(args[0]) is tuple:  # ((n, share), ...)
        return _parse_pairs(key, raw)
    return shared_parse_value(key, raw, tp)


def _parse_pairs(key: str, raw: Any) -> tuple[tuple[int, float], ...]:
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = json.loads(text) if text.startswith("[") else [p.split(":") for p in text.split(",") if p.strip()]
        except json.JSONDecodeError:
            raw = None
    try:
        pairs = tuple((int(n), float(share)) for n, share in raw)
    except (TypeError, ValueError):
        _fail(key, f"expects n:share pairs like 2:0.2,3:0.18, got {raw!r}")
    if any(n < 1 or not 0 <= share <= 1 for n, share in pairs):
        _fail(key, f"expects n >= 1 and shares between 0 and 1, got {raw!r}")
    return pairs


def apply_overrides(cfg: CurateConfig, overrides: dict[str, Any]) -> CurateConfig:
    """Apply {'minhash.threshold': '0.7', 'stages': 'exact_dedup,pii', ...}; unknown keys and wrong types raise."""
    top = field_types(cfg)
    changes: dict[str, dict[str, Any]] = {}
    for key, raw in overrides.items():
        if key in ("stages", "name"):
            cfg = dataclasses.replace(cfg, **{key: parse_value(key, raw, top[key])})
            continue
        section, _, field = key.partition(".")
        if section not in SECTIONS or not field:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"did you mean '{close[0]}.{field}'? " if close and field else ""
            _fail(key, f"unknown spec key; {hint}sections are {', '.join(SECTIONS)} (and stages, name)")
        types_ = field_types(getattr(cfg, section))
        if field not in types_:
            close = difflib.get_close_matches(field, types_, n=1)
            hint = f"did you mean '{section}.{close[0]}'? " if close else ""
            _fail(key, f"unknown spec key; {hint}{section} has: {', '.join(types_)}")
        changes.setdefault(section, {})[field] = parse_value(key, raw, types_[field])
    for section, fields in changes.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})
    return cfg


# --- MinHash bands and rows -------------------------------------------------------------------------------------

def lsh_threshold(bands: int, rows: int) -> float:
    """Where the LSH S-curve rises steepest: the Jaccard similarity t = (1/bands)**(1/rows)."""
    return (1.0 / bands) ** (1.0 / rows)


def catch_probability(s: float, bands: int, rows: int) -> float:
    """The chance that a pair with Jaccard similarity s shares at least one whole band."""
    return 1.0 - (1.0 - s ** rows) ** bands


def bands_rows(m: MinhashConfig) -> tuple[int, int]:
    """The (bands, rows) a MinHash section runs with, or a UserError when they contradict num_hashes/threshold."""
    n = m.num_hashes
    if m.bands < 0 or m.rows < 0:
        raise UserError("minhash.bands, minhash.rows: must be >= 0 (0: chosen from minhash.threshold)")
    if not (m.bands or m.rows):
        pairs = [(b, n // b) for b in range(1, n + 1) if n % b == 0]
        return min(pairs, key=lambda br: (abs(lsh_threshold(*br) - m.threshold), br[0]))
    if m.bands and m.rows and m.bands * m.rows != n:
        raise UserError(f"minhash: bands {m.bands} x rows {m.rows} = {m.bands * m.rows} hashes, not "
                        f"minhash.num_hashes {n}; make bands x rows equal num_hashes (or set bands and rows to 0 "
                        "to choose them from minhash.threshold)")
    given = m.bands or m.rows
    if n % given:
        which = "bands" if m.bands else "rows"
        raise UserError(f"minhash.{which}: {given} does not divide minhash.num_hashes {n}; bands x rows must equal "
                        "num_hashes")
    b, r = (m.bands, n // m.bands) if m.bands else (n // m.rows, m.rows)
    t = lsh_threshold(b, r)
    if abs(t - m.threshold) > 0.05:
        raise UserError(f"minhash: bands {b} x rows {r} put the LSH threshold (1/bands)^(1/rows) at {t:.2f}, not "
                        f"minhash.threshold {m.threshold}; set --minhash.threshold {t:.2f}, or bands and rows to 0 "
                        "to choose them from the threshold")
    return b, r


# --- validation and loading -------------------------------------------------------------------------------------

def validate(cfg: CurateConfig) -> None:
    """Refuse, before anything runs, a spec that cannot run; one line naming the key and the fix."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise UserError(f"stages: unknown stage '{unknown[0]}'; known: {', '.join(STAGES)}")
    twice = sorted({s for s in cfg.stages if cfg.stages.count(s) > 1})
    if twice:
        raise UserError(f"stages: '{twice[0]}' is listed twice; list each stage once")
    if not cfg.input.path:
        raise UserError("input.path: no input given; pass --input CORPUS.jsonl (a JSONL file, folder or glob)")
    if not cfg.output.path:
        raise UserError("output.path: no output folder given; pass --output DIR")
    if not cfg.input.text_field:
        raise UserError("input.text_field: empty; name the field that holds each record's text")
    if cfg.run.tasks < 1:
        raise UserError(f"run.tasks: must be >= 1, got {cfg.run.tasks}")
    if cfg.run.workers < 0:
        raise UserError(f"run.workers: must be >= 0 (0: all cores), got {cfg.run.workers}")
    if "minhash_dedup" in cfg.stages:
        m = cfg.minhash
        if m.n_grams < 1 or m.num_hashes < 1:
            raise UserError("minhash.n_grams, minhash.num_hashes: must be >= 1")
        if not 0 < m.threshold < 1:
            raise UserError(f"minhash.threshold: a Jaccard similarity between 0 and 1, got {m.threshold}")
        bands_rows(m)
    if "decontaminate" in cfg.stages and cfg.decontaminate.n < 1:
        raise UserError(f"decontaminate.n: must be >= 1, got {cfg.decontaminate.n}")
    if "pii" in cfg.stages and cfg.pii.phones:
        _check_region(cfg.pii.phone_region)
    if cfg.run.executor == "slurm" and not cfg.slurm.partition:
        raise UserError("slurm.partition: empty; name the Slurm partition to run on (--slurm.partition NAME)")


def _check_region(region: str) -> None:
    try:
        import phonenumbers
    except ImportError:
        return  # check_extra names the missing package
    if region.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise UserError(f"pii.phone_region: {region!r} is not a region libphonenumber knows; use an ISO 3166 code "
                        "such as US, GB, DE, IN")


def load_spec(path: str) -> CurateConfig:
    """Import a spec file and call its get_config()."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"spec file not found: {path} (try experiments/curate_default.py)")
    mod_spec = importlib.util.spec_from_file_location(f"meshforge_curate_spec_{p.stem}", p)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    try:
        mod_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise UserError(f"{path}: a curation spec must define get_config() returning a CurateConfig")
        cfg = module.get_config()
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None
    if not isinstance(cfg, CurateConfig):
        raise UserError(f"{path}: get_config() returned {type(cfg).__name__}, not a data.curate.spec.CurateConfig")
    return cfg


# The packages of the `curate` extra, by import name -> the name to pip install.
EXTRA = {"datatrove": "datatrove", "orjson": "orjson", "spacy": "spacy", "phonenumbers": "phonenumbers",
         "matplotlib": "matplotlib"}


def check_extra() -> None:
    """One line naming the extra when a package of it is missing (before anything imports them)."""
    missing = [pip for mod, pip in EXTRA.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise UserError(f"meshforge curate needs {', '.join(missing)}: pip install -e '.[curate]'")
