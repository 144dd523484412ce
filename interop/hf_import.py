"""Import a HuggingFace folder (config.json + *.safetensors): its ModelConfig, and its weights loaded straight
into the sharded layout of the current mesh.

Every parameter is built with jax.make_array_from_callback: the callback of each local device reads only the
slice that device holds, through safetensors' lazy slices, so no host ever holds a full copy of a tensor it does
not need (a replicated parameter is, by definition, needed whole).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import jax
import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from safetensors import safe_open

from interop.families import Family, factor_sizes, model_fields
from interop.layout import View, bind
from models.transformer import ModelConfig
from parallel.errors import UserError

INDEX = "model.safetensors.index.json"


def read_hf_config(folder: str | Path) -> dict:
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: no such file; an HF model folder has config.json next to its *.safetensors")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e})") from None


def real_vocab_size(folder: str | Path) -> int:
    """The checkpoint's own vocabulary; the model's vocab_size is this padded to a multiple of 64."""
    return int(read_hf_config(folder)["vocab_size"])


def hf_model_config(folder: str | Path, base: ModelConfig) -> ModelConfig:
    """The architecture of the folder's config.json; training-only fields (dropout, scan_layers, remat, dtype,
    param_dtype, loss_chunk, attention_impl, ...) are kept from base."""
    _, fields = model_fields(read_hf_config(folder))
    try:
        return dataclasses.replace(base, **fields)
    except ValueError as e:  # ModelConfig's own checks: a config.json meshforge cannot build
        raise UserError(f"{Path(folder) / 'config.json'}: {e}") from None


class Checkpoint:
    """The folder's safetensors files, opened lazily: tensor name -> file, shape, and sliced reads."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (folder / f).is_file():
                    raise UserError(f"{folder / f}: no such file, but {INDEX} lists it; copy the complete "
                                    "checkpoint")
            self.where = {name: folder / f for name, f in weight_map.items()}
            return
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            extra = " (found PyTorch .bin weights: convert them to safetensors)" if any(folder.glob("*.bin")) else ""
            raise UserError(f"{folder}: no *.safetensors weights (model.safetensors or {INDEX}){extra}; "
                            "--train.init_from needs an HF folder with safetensors weights")
        self.where = {}
        for f in files:
            with safe_open(f, "numpy") as h:
                self.where.update({name: f for name in h.keys()})

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, object] = {}
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def resolve(self, name: str) -> str:
        """The stored name: checkpoints of the bare model (GPT2Model, LlamaModel, the original gpt2 upload) lack
        the 'transformer.' / 'model.' prefix that the tables use."""
        if name in self.where:
            return name
        bare = name.split(".", 1)[-1]
        if bare in self.where:
            return bare
        files = ", ".join(sorted({p.name for p in self.where.values()}))
        raise UserError(f"{self.folder}: tensor {name} is missing from {files}; the weights do not match "
                        "config.json (or the checkpoint is incomplete)")

    def handle(self, name: str):
        f = self.where[name]
        if f not in self._open:
            self._open[f] = self._stack.enter_context(safe_open(f, "numpy"))
        return self._open[f]

    def shape(self, name: str) -> tuple[int, ...]:
        name = self.resolve(name)
        return tuple(self.handle(name).get_slice(name).get_shape())

    def get(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        name = self.resolve(name)
        return self.handle(name).get_slice(name)[slices]


def check_shapes(ckpt: Checkpoint, views: dict[str, View]) -> None:
    for view in views.values():
        want = view.src_shape()
        for name in view.names():
            got = ckpt.shape(name)
            if got != want:
                raise UserError(f"{ckpt.where[ckpt.resolve(name)]}: tensor {name} has shape {list(got)} but "
                                f"config.json implies {list(want)}; the weights and config.json disagree")


def family_views(folder: Path, cfg: ModelConfig, shapes: dict) -> tuple[Family, dict[str, View]]:
    hf = read_hf_config(folder)
    fam, _ = model_fields(hf)
    sizes = factor_sizes(cfg, int(hf["vocab_size"]))
    return fam, bind(fam.tensors, sizes, shapes, stacked=cfg.scan_layers, interleaved=fam.interleaved)


def load_hf_params(folder: str | Path, mdef, param_shardings: dict, *, others: dict | None = None) -> dict:
    """The folder's weights as the pure-dict parameter tree of `mdef` (train.state.ModelDef), each leaf a
    jax.Array with its NamedSharding from `param_shardings`. Parameters the family table does not cover (LoRA
    adapters) are taken from `others` (same tree, e.g. freshly initialised parameters)."""
    folder = Path(folder).expanduser()
    shapes = mdef.param_shapes()
    _, views = family_views(folder, mdef.cfg, shapes)
    with Checkpoint(folder) as ckpt:
        check_shapes(ckpt, views)

        def leaf(path, sds, sharding, other=None):
            key = "/".join(str(getattr(k, "key", k)) for k in path)
            if key not in views:
                if other is None:
                    raise ValueError(f"parameter {key} has no HF counterpart; pass `others` to fill it")
                return other
            view = views[key]
            return jax.make_array_from_callback(sds.shape, sharding,
                                                lambda idx: view.read(idx, ckpt.get, sds.dtype))

        if others is None:
            return jax.tree_util.tree_map_with_path(leaf, shapes, param_shardings)
        return jax.tree_util.tree_map_with_path(leaf, shapes, param_shardings, others)
