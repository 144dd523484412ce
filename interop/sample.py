"""`meshforge sample`: text from a run's checkpoint or a HuggingFace folder, with the KV-cache generator."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from data.tokenize import eos_id, load_tokenizer
from parallel.errors import UserError
from train.generate import Generator, Sampling


def _sampling(args) -> Sampling:
    if args.num_samples < 1 or args.max_new_tokens < 0:
        raise UserError("--num-samples must be >= 1 and --max-new-tokens >= 0")
    try:  # Sampling checks its own fields (a NaN temperature fails `>= 0` too)
        return Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UserError(f"--temperature/--top-k/--top-p: {e}") from None


def generate_text(mdef, mesh, param_shardings, params, tokenizer, args, label: str) -> int:
    sampling = _sampling(args)
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        raise UserError("--prompt: give at least one character")
    eos = eos_id(tokenizer)
    gen = Generator(mdef, mesh, param_shardings, vocab_limit=tokenizer.vocab_size, eos_id=eos)
    try:
        outs = gen.generate(params, [prompt] * args.num_samples, args.max_new_tokens, sampling, seed=args.seed)
    except ValueError as e:
        raise UserError(f"sample: {e}") from None
    for i, new in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ({label}) ---")
        if len(new) and new[-1] == eos:
            new = new[:-1]  # the end-of-sequence token ends the text; it is not part of it
        print(tokenizer.decode(list(prompt) + list(new)))
    return 0


def sample_run(loaded, args) -> int:
    """Sample from a run's checkpoint (train.restore.Loaded)."""
    if not loaded.cfg.model.causal:
        raise UserError("sample: this run holds a bidirectional (masked-LM) model, which cannot generate text left "
                        "to right; sample from a causal run")
    return generate_text(loaded.mdef, loaded.mesh, loaded.param_shardings, loaded.params, loaded.tokenizer, args,
                         f"step {loaded.step}")


def sample_folder(folder: Path, cfg, args) -> int:
    """Sample from a HuggingFace folder: its architecture, weights (sharded on the default mesh) and tokenizer."""
    from interop.hf_import import hf_model_config, load_hf_params
    from parallel.mesh import make_mesh
    from parallel.rules import activate
    from train.setup import resolve_model
    from train.state import model_def, param_shardings

    tokenizer = load_tokenizer(folder)
    # an HF folder holds no adapters: sample the model as it is
    cfg = dataclasses.replace(cfg, model=hf_model_config(folder, dataclasses.replace(cfg.model, lora_rank=0)))
    cfg = resolve_model(cfg, tokenizer.vocab_size)
    mesh = make_mesh(cfg.mesh)
    mdef = model_def(cfg.model)
    shardings = param_shardings(mdef, mesh)
    with activate(mesh):
        params = load_hf_params(folder, mdef, shardings)
    return generate_text(mdef, mesh, shardings, params, tokenizer, args, folder.name)
