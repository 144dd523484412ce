"""HuggingFace hub datasets as sources: `hf:NAMESPACE/NAME[/CONFIG][:SPLIT][?streaming=1]` (grammar:
SourceConfig's docstring). A streamed one is never prepared on disk: data/stream.py reads it in order.

Why through `datasets` and its own cache rather than our own download: a machine (or a cluster's shared cache
folder) that already holds a dataset then needs no network, and a run reads the same memory-mapped Arrow files a
notebook's `load_dataset` left there. Offline, `datasets` 5.2 finds a hub name only in its prepared Arrow cache
($HF_DATASETS_CACHE/NAMESPACE___NAME/CONFIG/VERSION/REVISION/, what an earlier online load wrote); it refuses
before looking at the hub's file cache ($HF_HUB_CACHE/datasets--NAMESPACE--NAME/snapshots/REVISION/, what
`hf download --repo-type dataset` writes), so that snapshot is read here as a local folder when the Arrow cache
lacks the dataset.

Offline is a setting (`data.hf_offline`), not forced: a researcher naming a hub dataset expects it to download.
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE in the environment always win (the test suite sets them: no test can reach
the network). Both libraries read those variables once, at import, into module globals that every request
consults; `apply_offline` sets those globals (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.
HF_HUB_OFFLINE), which is how the mode switches inside a running process.

The revision (the hub commit a prepared cache was built from) is part of the source's fingerprint, so packed rows
cached from one revision are never reused for another.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from parallel.errors import UserError

if TYPE_CHECKING:
    import datasets

PREFIX = "hf:"
DEFAULT_SPLIT = "train"
ENV_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SPLIT = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)(\[[^\]]*\])?(\+.*)?")  # datasets' split syntax: train[:10%]+test

_setting = {"offline": False}  # data.hf_offline of the data section built last in this process


@dataclasses.dataclass(frozen=True)
class HubName:
    repo: str  # NAMESPACE/NAME (or a legacy NAME without a namespace)
    config: str | None  # None: the dataset's default (or only) configuration
    split: str  # a split name, or datasets' slice syntax such as train[:5%]
    streaming: bool = False  # ?streaming=1: read in order, never prepared on disk (data/stream.py)


def is_hub(path: str) -> bool:
    return path.startswith(PREFIX)


def is_streamed(path: str, key: str = "data") -> bool:
    return is_hub(path) and parse(key, path).streaming


def _flag(key: str, path: str, name: str, value: str) -> bool:
    if value.lower() not in {"0", "1", "true", "false"}:
        raise UserError(f"{key}.path: {name}={value!r} in {path} is not a flag; write {name}=1 or {name}=0")
    return value.lower() in {"1", "true"}


def parse(key: str, path: str) -> HubName:
    """`hf:NAMESPACE/NAME[/CONFIG][:SPLIT][?streaming=1]` -> HubName; a name without '/' is a legacy hub name
    with no config."""
    spec, _, query = path.removeprefix(PREFIX).partition("?")
    options = dict(kv.partition("=")[::2] for kv in query.split("&") if kv)
    unknown = sorted(set(options) - {"streaming"})
    if unknown:
        raise UserError(f"{key}.path: unknown option {unknown[0]!r} in {path}; a hub source takes ?streaming=1")
    streaming = _flag(key, path, "streaming", options.get("streaming", "0"))
    ident, colon, split = spec.partition(":")  # hub names never hold ':', so the first one starts the split
    parts = ident.split("/")
    split = split if colon else DEFAULT_SPLIT
    if len(parts) > 3 or not all(_NAME_PART.fullmatch(p) for p in parts) or not _SPLIT.fullmatch(split):
        raise UserError(f"{key}.path: write a hub dataset as hf:NAMESPACE/NAME[/CONFIG][:SPLIT] (e.g. "
                        f"hf:roneneldan/TinyStories:train, hf:Salesforce/wikitext/wikitext-2-raw-v1:validation), "
                        f"got {path!r}")
    if streaming and split != _SPLIT.fullmatch(split)["name"]:
        raise UserError(f"{key}.path: a streamed split is read whole, in order; {split!r} is a slice (drop "
                        "?streaming=1, or name the split alone)")
    repo = "/".join(parts[:2])
    return HubName(repo, parts[2] if len(parts) == 3 else None, split, streaming)


# --- offline mode -----------------------------------------------------------------------------------------------

def _env_offline_vars() -> list[str]:
    return [v for v in ENV_OFFLINE if os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}]


def env_offline() -> bool:
    return bool(_env_offline_vars())


def is_offline() -> bool:
    return _setting["offline"] or env_offline()


def set_offline(offline: bool) -> None:
    """Take a data section's `hf_offline` (the environment's offline variables still win when set)."""
    _setting["offline"] = bool(offline)
    if "datasets" in sys.modules:  # else the next hub load applies it
        apply_offline()


def apply_offline() -> bool:
    """Set both libraries' offline globals to the current mode (they read the environment only at import)."""
    import datasets.config
    import huggingface_hub.constants

    offline = is_offline()
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = offline
    huggingface_hub.constants.HF_HUB_OFFLINE = offline
    return offline


def _offline_why_and_fix() -> tuple[str, str]:
    env = _env_offline_vars()
    if env:
        return f"{env[0]}={os.environ[env[0]]} is set", f"unset {' and '.join(env)}"
    return "data.hf_offline is true", "set data.hf_offline false"


# --- resolving a name to a builder ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Resolved:
    builder: "datasets.DatasetBuilder"
    revision: str  # the hub commit the data comes from (a prepared cache's or a file-cache snapshot's)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@functools.lru_cache(maxsize=16)
def _resolve(repo: str, config: str | None, offline: bool, cache: str, hub_cache: str) -> Resolved:
    """The builder of a hub dataset, once per process and mode (online, resolving asks the hub for the revision)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(repo, config)
        return Resolved(builder, str(builder.hash))
    except ConnectionError as e:  # offline (or no network) and not in datasets' Arrow cache
        missing = e
    snapshot = _snapshot(repo)
    if snapshot is None:
        raise missing
    return Resolved(datasets.load_dataset_builder(str(snapshot), config), snapshot.name)


def _snapshot(repo: str) -> Path | None:
    """The hub file cache's snapshot of the dataset repository (its main ref), if one is there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def resolve(key: str, path: str) -> tuple[HubName, Resolved]:
    """Parse and resolve a hub source; every failure is a one-line UserError naming the source key."""
    import huggingface_hub.constants

    from data.sources import hf_datasets  # (it imports this module)

    name = parse(key, path)
    datasets = hf_datasets()  # quiet: datasets' cache-hit warnings are not a user's business
    offline = apply_offline()
    cache = str(datasets.config.HF_DATASETS_CACHE)
    try:  # (the caches are part of the memo's key: tests and tools may point them elsewhere at run time)
        resolved = _resolve(name.repo, name.config, offline, cache, huggingface_hub.constants.HF_HUB_CACHE)
    except ConnectionError as e:
        if offline:
            why, fix = _offline_why_and_fix()
            raise UserError(f"{key}.path: {path} is not in the HuggingFace datasets cache ({cache}) and {why}; "
                            f"with the network, {fix} to download it, or pre-download it (datasets.load_dataset or "
                            "hf download --repo-type dataset), or point HF_DATASETS_CACHE / HF_HOME at a cache that "
                            "holds it") from None
        raise UserError(f"{key}.path: could not reach the HuggingFace hub for {name.repo} ({_first_line(e)}) and it "
                        f"is not in the cache ({cache}); check the network, or set HF_ENDPOINT to a mirror") from None
    except datasets.exceptions.DatasetNotFoundError as e:
        hint = ("; a config of a dataset without a namespace? write hf:NAMESPACE/NAME/CONFIG"
                if name.repo.count("/") == 1 and name.config is None else "")
        raise UserError(f"{key}.path: {_first_line(e)} (gated or private: log in with `hf auth login` or set "
                        f"HF_TOKEN){hint}") from None
    except ValueError as e:  # an unknown config, or several cached configs and none named
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        text = "; ".join(ln for ln in lines if not ln.startswith(("Please", "load_dataset")))  # (datasets' hints)
        raise UserError(f"{key}.path: {path}: {text}; name a config as hf:NAMESPACE/NAME/CONFIG:SPLIT") from None
    except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
        raise UserError(f"{key}.path: {path}: {_first_line(e)}") from None
    return name, resolved


def fingerprint(key: str, path: str) -> dict:
    """What a hub source's documents are: the repository, configuration, split and revision."""
    name, r = resolve(key, path)
    return {"repo": name.repo, "config": r.builder.config.name, "split": name.split, "revision": r.revision,
            "version": str(r.builder.config.version)}


def load(key: str, path: str) -> "datasets.Dataset":
    """The split as a memory-mapped Dataset: prepared in datasets' cache first if it is not there yet."""
    import datasets
    from datasets.utils.tqdm import are_progress_bars_disabled

    name, r = resolve(key, path)
    if name.streaming:
        raise UserError(f"{key}.path: {path} is streamed, so it is never read whole, and this use needs all of it "
                        "(fitting a char or bpe tokenizer: set data.tokenizer byte or data.tokenizer_path; sft and "
                        "federated clients: drop ?streaming=1)")
    splits = list(r.builder.info.splits or {})
    base = _SPLIT.fullmatch(name.split)["name"]
    if splits and base not in splits:
        raise UserError(f"{key}.path: {name.repo} has no split {base!r} (its splits: {', '.join(splits)}); write "
                        f"hf:{name.repo}{'/' + name.config if name.config else ''}:SPLIT")
    bars = sys.stderr.isatty() and are_progress_bars_disabled()
    if bars:  # a download can take long: show it in a terminal
        datasets.enable_progress_bars()
    try:
        r.builder.download_and_prepare()
        return r.builder.as_dataset(split=name.split)
    except ConnectionError as e:
        raise UserError(f"{key}.path: could not download {name.repo} ({_first_line(e)}); check the network or "
                        "HF_ENDPOINT, or set data.hf_offline with the dataset in the cache") from None
    except ValueError as e:  # a bad split slice such as train[:200%]
        raise UserError(f"{key}.path: {path}: {_first_line(e)}") from None
    finally:
        if bars:
            datasets.disable_progress_bars()


def open_stream(key: str, path: str) -> "datasets.IterableDataset":
    """The split as an IterableDataset read in order (from the hub's files, or datasets' cache offline)."""
    name, r = resolve(key, path)
    try:
        return r.builder.as_streaming_dataset(split=name.split)
    except ValueError as e:  # an unknown split
        raise UserError(f"{key}.path: {path}: {_first_line(e)}") from None
