"""Export parameters to a HuggingFace folder that transformers.AutoModelForCausalLM.from_pretrained loads:
config.json, generation_config.json, model.safetensors (or shards plus an index), and the tokenizer files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes  # noqa: F401 - bfloat16 for numpy and safetensors
import numpy as np
from safetensors.numpy import save_file

from interop.families import FAMILIES, Family, factor_sizes, family_for_model, family_of
from interop.families import hf_config as config_json
from interop.hf_import import INDEX
from interop.layout import bind
from models.transformer import ModelConfig
from parallel.errors import UserError

# What a tokenizer folder may hold; everything present is copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")
MAX_SHARD_BYTES = 2 * 1024**3
SPECIAL_KEYS = {"<eos>": "eos_token", "<pad>": "pad_token", "<mask>": "mask_token"}  # meshforge's specials


def to_host(x) -> np.ndarray:
    """A parameter as one host array, gathered from every process if it is sharded across hosts."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def pick_family(cfg: ModelConfig, family: str | None, base: dict | None) -> Family:
    if base is not None:
        fam = family_of(base)
    elif family is not None:
        if family not in FAMILIES:
            raise UserError(f"export: unknown HF family {family!r}; choose one of {', '.join(FAMILIES)}")
        fam = FAMILIES[family]
    else:
        return family_for_model(cfg)
    key = fam.misfit(cfg)
    if key:
        raise UserError(f"{key}: {getattr(cfg, key.split('.', 1)[1])!r} does not fit the {fam.name} family; "
                        "export needs the architecture the model was imported with")
    return fam


def hf_tensors(params: dict, cfg: ModelConfig, fam: Family, vocab_size: int) -> dict[str, np.ndarray]:
    """HF tensor name -> array, in the parameters' dtype; padded vocabulary rows are dropped."""
    host = jax.tree.map(to_host, params)
    views = bind(fam.tensors, factor_sizes(cfg, vocab_size), host, stacked=cfg.scan_layers,
                 interleaved=fam.interleaved)
    out: dict[str, np.ndarray] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(host)[0]:
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        if key not in views:
            raise ValueError(f"parameter {key} has no HF counterpart in the {fam.name} table; merge LoRA adapters "
                             "into the base weights before exporting")
        view = views[key]
        view.write(value, lambda name, v=view, dt=value.dtype: out.setdefault(name, np.zeros(v.src_shape(), dt)))
    return out


def save_weights(tensors: dict[str, np.ndarray], out: Path, max_shard_bytes: int) -> None:
    total = sum(a.nbytes for a in tensors.values())
    meta = {"format": "pt"}  # transformers refuses safetensors files without a known format
    if total <= max_shard_bytes:
        save_file(tensors, out / "model.safetensors", metadata=meta)
        return
    shards, size = [[]], 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += a.nbytes
    weight_map = {}
    for j, names in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, out / fname, metadata=meta)
        weight_map.update({n: fname for n in names})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def tokenizer_json(spec: dict) -> dict:
    """A HuggingFace `tokenizers` JSON from a tokenizer spec: meshforge's BPE wraps one, an HF file is one."""
    if spec.get("kind") == "bpe":
        return json.loads(spec["tokenizer"])
    if "model" in spec and "pre_tokenizer" in spec:
        return spec
    raise UserError(f"export: the {spec.get('kind')!r} tokenizer has no HuggingFace form; train the model with "
                    "data.tokenizer bpe or pass the tokenizer folder of an HF model")


def save_tokenizer(out: Path, spec: dict, max_len: int) -> dict[str, int]:
    """tokenizer.json and a tokenizer_config.json for PreTrainedTokenizerFast; returns the special token ids."""
    tok = tokenizer_json(spec)
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    added = {t["content"]: t["id"] for t in tok.get("added_tokens") or []}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    ids = {}
    for content, key in SPECIAL_KEYS.items():
        if content in added:
            config[key] = content
            ids[key.replace("_token", "_token_id")] = added[content]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids


def export_hf(params: dict, model_cfg: ModelConfig, out_dir: str | Path, *, family: str | None = None,
              hf_config: dict | None = None, vocab_size: int | None = None,
              tokenizer_dir: str | Path | None = None, tokenizer: dict | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `params` (pure-dict tree, host or jax arrays, LoRA merged) as an HF folder at out_dir.

    The family is that of hf_config (the config.json of the folder the model was imported from, whose
    token ids and other entries are kept), else `family`, else the one that fits model_cfg. vocab_size is the
    real vocabulary (default: hf_config's, else the model's); padded rows are dropped. The tokenizer comes
    from tokenizer_dir (an HF folder: its tokenizer files are copied) or `tokenizer` (a meshforge or HF
    tokenizer JSON object).
    """
    if model_cfg.parametrization != "standard":
        # HF models have no readout multiplier or 1/head_dim attention: the folder would load and be wrong
        raise UserError(f"model.parametrization: a {model_cfg.parametrization} model has no HuggingFace form (its "
                        "logit multiplier and attention scale differ); export it with --format stablehlo or iree")
    fam = pick_family(model_cfg, family, hf_config)
    vocab = int(vocab_size or (hf_config or {}).get("vocab_size") or model_cfg.vocab_size)
    if vocab > model_cfg.vocab_size:
        raise UserError(f"export: vocab_size {vocab} is larger than model.vocab_size {model_cfg.vocab_size}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_weights(hf_tensors(params, model_cfg, fam, vocab), out, max_shard_bytes)
    special_ids = {}
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir).expanduser()
        copied = [shutil.copy2(src / f, out / f) for f in TOKENIZER_FILES if (src / f).is_file()]
        if not copied:
            raise UserError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    elif tokenizer is not None:
        special_ids = save_tokenizer(out, tokenizer, model_cfg.max_seq_len)
    config = config_json(fam, model_cfg, vocab, hf_config)
    for key, value in special_ids.items():
        config.setdefault(key, value)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    if gen:
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
