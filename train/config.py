"""The run config: one frozen dataclass per section, command-line overrides, experiment-file loading.

Each section's dataclass lives with the code that consumes it (ModelConfig in models/, OptimConfig in optim/,
...); this module only assembles them. Overrides are type-checked against the dataclass field types.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Literal

from data.config import DataConfig
from models.transformer import ModelConfig
from optim.chains import OptimConfig
from optim.outer import OuterConfig
from optim.prune import PruneConfig
from parallel.errors import UserError
from parallel.overrides import field_types, parse_records, parse_value  # noqa: F401 (re-exported)
from parallel.mesh import MeshConfig
from train.energy import AccountingConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 12  # global batch, in sequences
    seq_len: int = 64
    seed: int = 0
    eval_every: int = 500  # 0: evaluate only at the end
    eval_batches: int = 0  # 0: the whole validation split
    eval_batch_size: int = 64
    checkpoint_every: int = 500  # 0: only at the end
    checkpoint_every_s: float = 0.0  # also checkpoint when this many seconds passed since the last one; 0: off
    keep_checkpoints: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: off
    log_every: int = 50
    preempt_grace_s: float = 60.0  # after SIGTERM: checkpoint and exit within this many seconds
    nonfinite: Literal["skip", "stop"] = "skip"  # a step with NaN/Inf gradients is skipped; or stop the run
    max_nonfinite_in_a_row: int = 20  # with "skip": stop after this many consecutive skipped steps
    spike_factor: float = 3.0  # log a loss spike when a step's loss exceeds this x the running mean; 0: off
    # Start from pretrained weights: a HuggingFace folder (config.json, *.safetensors, tokenizer.json) or another
    # meshforge run's workdir. The architecture (model.*) and the tokenizer then come from there.
    init_from: str = ""
    # Train only the parameters whose path (e.g. blocks/0/attn/wq_DNH, final_norm/scale_D) this regex finds;
    # "" trains all (with LoRA: the adapters only, plus what this regex finds).
    trainable: str = ""
    # JAX's persistent compilation cache: a rerun of an experiment (or any run whose compiled programs are already
    # there) skips compiling them. "" turns it off; the JAX_COMPILATION_CACHE_DIR variable wins over this.
    compile_cache: str = "~/.cache/meshforge/jax"

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_batch_size", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "checkpoint_every", "checkpoint_every_s", "keep_every",
                     "preempt_grace_s", "max_nonfinite_in_a_row", "spike_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    progress: Literal["auto", "bar", "lines", "none"] = "auto"  # auto: a bar on a terminal, lines otherwise
    tensorboard: bool = True
    # Weights & Biases: every log row also goes to this W&B project ("" off; needs `pip install wandb`). Offline by
    # default: the run is kept under WORKDIR/wandb/ for `wandb sync`; online sends it as it goes.
    wandb_project: str = ""
    wandb_mode: Literal["offline", "online"] = "offline"
    # Per-layer and per-group gradient norms, update/parameter ratios and activation RMS (train/diagnostics.py),
    # written into the log row of every step that is a multiple of this (a multiple of train.log_every); 0: off,
    # and then not computed at all. A layer whose gradient norm is below the median layer's / vanishing_factor or
    # above it x exploding_factor gets a warning.
    diagnostics_every: int = 0
    vanishing_factor: float = 100.0
    exploding_factor: float = 100.0

    def __post_init__(self):
        if self.diagnostics_every < 0:
            raise ValueError(f"log.diagnostics_every must be >= 0 (0: off), got {self.diagnostics_every}")
        for name in ("vanishing_factor", "exploding_factor"):
            if getattr(self, name) <= 1:
                raise ValueError(f"log.{name} must be > 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    prune: PruneConfig = PruneConfig()
    outer: OuterConfig = OuterConfig()  # replicas synchronising every H steps: DiLoCo, local SGD, federated
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    accounting: AccountingConfig = AccountingConfig()  # energy, carbon and cost: PUE, grid, power and prices
    name: str = "experiment"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "name")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply {'optim.lr': '3e-4', ...}. Unknown keys and wrong types raise UserError with the allowed values."""
    changes: dict[str, dict[str, Any]] = {}
    for key, raw in overrides.items():
        if key == "name":
            cfg = dataclasses.replace(cfg, name=str(raw))
            continue
        section, _, field = key.partition(".")
        if section not in SECTIONS or not field:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"did you mean '{close[0]}.{field}'? " if close and field else ""
            raise UserError(f"--{key}: unknown config key; {hint}sections are {', '.join(SECTIONS)}")
        types_ = field_types(getattr(cfg, section))
        if field not in types_:
            close = difflib.get_close_matches(field, types_, n=1)
            hint = f"did you mean '{section}.{close[0]}'? " if close else ""
            raise UserError(f"--{key}: unknown config key; {hint}{section} has: {', '.join(types_)}")
        changes.setdefault(section, {})[field] = parse_value(key, raw, types_[field])
    for section, fields in changes.items():
        try:
            new = dataclasses.replace(getattr(cfg, section), **fields)
        except ValueError as e:
            raise UserError(str(e)) from None
        cfg = dataclasses.replace(cfg, **{section: new})
    return cfg


def from_dict(d: dict) -> Config:
    """Rebuild a Config from config.json (for eval/sample on a finished run)."""
    flat = {f"{s}.{k}": v for s in SECTIONS for k, v in d.get(s, {}).items()}
    cfg = apply_overrides(Config(), flat)
    return dataclasses.replace(cfg, name=d.get("name", cfg.name))


def load_experiment(path: str) -> Config:
    """Import an experiment file and call its get_config()."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"experiment file not found: {path} (try experiments/shakespeare_char.py)")
    spec = importlib.util.spec_from_file_location(f"meshforge_experiment_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except ValueError as e:  # a section's own validation, e.g. ModelConfig(d_model=130, n_heads=4)
        raise UserError(f"{path}: {e}") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: an experiment file must define get_config() returning a train.config.Config")
    try:
        cfg = module.get_config()
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    if not isinstance(cfg, Config):
        raise UserError(f"{path}: get_config() must return a train.config.Config, got {type(cfg).__name__}")
    if cfg.name == Config.name:
        cfg = dataclasses.replace(cfg, name=p.stem)
    return cfg
