"""Where pretrained weights come from (`train.init_from`, `meshforge sample --from`): a HuggingFace folder or a
meshforge run. Either gives the architecture, the tokenizer, and a loader that places the weights straight into
the current mesh's layout."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax

from models.transformer import ModelConfig
from parallel.errors import UserError

# Fields a fine-tuning experiment chooses for itself; everything else in model.* is the pretrained architecture.
RUN_FIELDS = ("dropout", "scan_layers", "remat", "dtype", "param_dtype", "attention_impl", "loss_chunk",
              "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "moe_capacity_factor", "moe_lb_weight",
              "moe_z_weight", "qat", "qat_targets")


@dataclasses.dataclass
class Pretrained:
    kind: str  # "hf" or "run"
    path: Path
    model: ModelConfig  # the pretrained architecture with the experiment's RUN_FIELDS
    tokenizer_path: str
    load: Callable  # (mdef, param_shardings) -> params: the pretrained leaves (adapters are not among them)


def is_hf_folder(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return "model" not in json.loads((path / "config.json").read_text())  # a meshforge run's config has sections


def pretrained(source: str, base: ModelConfig) -> Pretrained:
    path = Path(source).expanduser()
    if not path.is_dir():
        raise UserError(f"train.init_from: {source} is not a folder; give a HuggingFace model folder "
                        "(config.json, *.safetensors, tokenizer.json) or a meshforge run's workdir")
    if is_hf_folder(path):
        from interop.hf_import import Checkpoint, hf_model_config, load_hf_params

        # the architecture is the folder's alone: nothing but the RUN_FIELDS comes from the experiment
        model = hf_model_config(path, dataclasses.replace(ModelConfig(), **{k: getattr(base, k) for k in RUN_FIELDS}))
        Checkpoint(path)  # the weights are there and readable: refuse now, before the run's workdir is touched

        def load_hf(mdef, shardings):
            # Parameters the folder lacks (LoRA adapters) come back as their ShapeDtypeStruct and are dropped:
            # init_state keeps their fresh initialisation.
            params = load_hf_params(path, mdef, shardings, others=mdef.param_shapes())
            return _drop(params, lambda x: isinstance(x, jax.ShapeDtypeStruct))

        return Pretrained("hf", path, model, str(path), load_hf)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return _from_run(path, base)
    raise UserError(f"train.init_from: {source} holds neither a HuggingFace model (config.json) nor a meshforge "
                    "run (config.json and checkpoints/)")


def _drop(tree: dict, unwanted) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            v = _drop(v, unwanted)
            if v:
                out[k] = v
        elif not unwanted(v):
            out[k] = v
    return out


def _from_run(path: Path, base: ModelConfig) -> Pretrained:
    from train.config import from_dict

    saved = from_dict(json.loads((path / "config.json").read_text()))
    keep = {k: getattr(base, k) for k in RUN_FIELDS}
    model = dataclasses.replace(saved.model, **keep)

    def load_run(mdef, shardings):
        from train.restore import restore_params

        return restore_params(saved, path, mdef, shardings)

    return Pretrained("run", path, model, str(path / "tokenizer.json"), load_run)


def starting_point(cfg):
    """(cfg, initial) for a run with train.init_from: the model section becomes the pretrained architecture
    (keeping the experiment's RUN_FIELDS), the tokenizer the pretrained one (unless data.tokenizer_path is set),
    and initial(mdef, param_shardings) loads the weights."""
    p = pretrained(cfg.train.init_from, cfg.model)
    data = cfg.data if cfg.data.tokenizer_path else dataclasses.replace(cfg.data, tokenizer_path=str(p.tokenizer_path))
    # the absolute path goes into the run's config.json: export finds the source folder from anywhere
    train = dataclasses.replace(cfg.train, init_from=str(p.path.resolve()))
    return dataclasses.replace(cfg, model=p.model, data=data, train=train), p.load


def resuming_point(cfg, workdir: Path):
    """The config of a fine-tuning run that resumes from its own checkpoints: the architecture its config.json
    recorded (with the experiment's RUN_FIELDS) and its own tokenizer.json, so the init_from source may be gone."""
    from train.config import from_dict

    saved = from_dict(json.loads((workdir / "config.json").read_text()))
    model = dataclasses.replace(saved.model, **{k: getattr(cfg.model, k) for k in RUN_FIELDS})
    data = dataclasses.replace(cfg.data, tokenizer_path=str(workdir / "tokenizer.json"))
    return dataclasses.replace(cfg, model=model, data=data, train=dataclasses.replace(
        cfg.train, init_from=saved.train.init_from or cfg.train.init_from))
