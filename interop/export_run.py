"""`meshforge export RUN`: a run's checkpoint as a HuggingFace model folder (LoRA merged), a PEFT adapter, or
functions for edge runtimes (StableHLO, IREE: interop/edge_export.py)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from parallel.errors import UserError


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; choose a new folder (nothing is "
                        "overwritten)")


def edge_options(args):
    """The stablehlo/iree options of the export command line, checked before any checkpoint is read."""
    import importlib.util

    from interop.edge_export import EdgeOptions

    if args.quantize and importlib.util.find_spec("qwix") is None:
        raise UserError("--quantize int8 needs qwix: pip install -e '.[edge]'")
    try:
        sizes = tuple(int(s) for s in str(args.batch_sizes).split(",") if s.strip())
    except ValueError:
        raise UserError(f"--batch-sizes {args.batch_sizes!r}: give comma-separated integers, e.g. 1,8") from None
    return EdgeOptions(batch_sizes=sizes, target=args.target, target_cpu=args.target_cpu,
                       quantize=args.quantize or "", quantize_targets=args.quantize_targets,
                       prompt_len=args.prompt_len, max_len=args.max_len)


def export_run(run: Path, fmt: str, out: Path, step: int | None = None, args=None) -> dict:
    from interop.hf_export import export_hf, to_host
    from interop.pretrained import is_hf_folder
    from models.lora import merge
    from parallel.mesh import configure_cpu_devices
    from train.config import from_dict

    if not (run / "config.json").is_file():
        raise UserError(f"export: {run} is not a meshforge run (no config.json); give the run's workdir")
    _check_out(out)
    edge = edge_options(args) if fmt in ("stablehlo", "iree") else None
    if edge is None and args is not None and (args.quantize or args.quantize_targets):
        raise UserError(f"--quantize: applies to --format stablehlo|iree; --format {fmt} writes float weights")
    if edge is not None and edge.quantize_targets and not edge.quantize:
        raise UserError("--quantize-targets: give --quantize int8 too (it says which weights that quantizes)")
    if fmt == "iree":
        from interop.edge_export import iree_compiler

        iree_compiler()  # installed? say so now, not after reading the checkpoint
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    configure_cpu_devices(1)  # on a CPU host one device reads the checkpoint; elsewhere all local devices do
    # whatever mesh the run was trained on: the parameters split (FSDP) over this host's devices
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1, fsdp=-1, tensor=1, expert=1,
                                                            cpu_devices=1))
    from train.restore import load_for_inference

    loaded = load_for_inference(cfg, run, step)
    params, step = _host(loaded.params, to_host), loaded.step
    m = loaded.cfg.model
    source = Path(cfg.train.init_from).expanduser() if cfg.train.init_from else None
    hf_dir = source if source is not None and source.is_dir() and is_hf_folder(source) else None
    if fmt == "peft":
        if not m.lora_rank:
            raise UserError(f"export --format peft: {run} has no LoRA adapters (model.lora_rank 0); use --format hf")
        from interop.peft_export import export_peft

        export_peft(params, m, out, base_model=str(hf_dir or source or ""))
        return {"step": step, "format": fmt, "out": str(out)}
    if m.lora_rank:
        params = merge(params, m.lora_alpha / m.lora_rank)
    plain = dataclasses.replace(m, lora_rank=0)
    if edge is not None:
        # the artifact runs on a CPU: compute in what a CPU run computes in, whichever host exports it
        plain = dataclasses.replace(plain, dtype="float32" if plain.dtype == "auto" else plain.dtype)
        plain, edge = _quantization_aware(plain, edge, m)
        from interop.edge_export import export_edge
        from train.state import model_def

        loaded = dataclasses.replace(loaded, cfg=dataclasses.replace(loaded.cfg, model=plain), mdef=model_def(plain))
        existed = out.exists()
        try:
            return export_edge(run, loaded, params, out, fmt, edge)
        except BaseException:
            _remove_partial(out, existed)
            raise
    hf_config = json.loads((hf_dir / "config.json").read_text()) if hf_dir else None
    tokenizer = None if hf_dir else json.loads((run / "tokenizer.json").read_text())
    export_hf(params, plain, out, hf_config=hf_config, tokenizer_dir=hf_dir, tokenizer=tokenizer,
              vocab_size=loaded.tokenizer.vocab_size if not hf_dir else None)
    return {"step": step, "format": fmt, "out": str(out)}


def _quantization_aware(plain, edge, trained):
    """The model and options an export of a quantization-aware run needs. Without --quantize the artifact fake-
    quantizes as training did. With --quantize int8 it stores exactly the int8 weights training computed with (the
    projections model.qat_targets found) and fake-quantizes only the inputs."""
    import re

    from models.lora import matching_targets

    if trained.qat == "none":
        return plain, edge
    if trained.lora_rank:
        raise UserError("export --format stablehlo|iree: this run trained LoRA adapters under model.qat, and merged "
                        "weights are not what it trained with; export --format peft, or train without one of them")
    if not edge.quantize:
        return plain, edge
    if trained.qat not in ("int8", "int8_weights"):
        raise UserError(f"--quantize int8: this run trained with model.qat {trained.qat}; export it without "
                        "--quantize (the artifact then computes as training did)")
    if edge.quantize_targets:
        raise UserError("--quantize-targets: a quantization-aware run quantizes the projections it trained with "
                        "(model.qat_targets); leave it out")
    targets = "|".join(re.escape(name) for name in matching_targets(trained.qat_targets))
    edge = dataclasses.replace(edge, quantize_targets=f"/({targets})$")
    return dataclasses.replace(plain, qat="int8_inputs" if trained.qat == "int8" else "none"), edge


def _remove_partial(out: Path, existed: bool) -> None:
    """A failed export leaves no half-written artifact: the folder was new (removed) or empty (emptied)."""
    import shutil

    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _host(tree, to_host):
    return {k: _host(v, to_host) if isinstance(v, dict) else to_host(v) for k, v in tree.items()}
