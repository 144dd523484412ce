"""Which parameters a run trains: all, those a regex over their paths finds (`train.trainable`), or LoRA adapters.

A mask is a pytree of bools shaped like the params (None: everything trains). `select` keeps the trained leaves
and puts None elsewhere: the gradient, the optimizer state and the update exist only for those leaves, so a
frozen parameter costs neither optimizer memory nor a weight gradient (XLA drops the dead computation).
"""
from __future__ import annotations

import re
from typing import Any

import jax

from models.axes import path_name  # noqa: F401 - re-exported: callers name paths through here too

Mask = Any  # pytree of bool shaped like the params, or None for "all"


def trainable_mask(params: Any, pattern: str = "", lora: bool = False) -> Mask:
    """True for the LoRA adapters (with lora) and the parameters whose path ('blocks/0/attn/wq_DNH', ...) the
    regex finds (re.search). None when everything trains. Refuses a regex that finds nothing."""
    if not pattern and not lora:
        return None
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as e:
        raise ValueError(f"train.trainable: {pattern!r} is not a regex ({e})") from None

    def leaf(path, _):
        name = path_name(path)
        return bool((lora and "_lora/" in name) or (regex and regex.search(name)))

    paths = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if regex and not any(regex.search(p) for p in paths):
        raise ValueError(f"train.trainable: {pattern!r} matches no parameter path; paths look like {paths[-1]} "
                         "(a regex, found with re.search)")
    return jax.tree_util.tree_map_with_path(leaf, params)


def select(tree: Any, mask: Mask) -> Any:
    """`tree` (params-shaped) with None in place of every frozen leaf."""
    if mask is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, tuple))
    keep = treedef.flatten_up_to(mask)
    return treedef.unflatten([x if k else None for x, k in zip(leaves, keep)])


def combine(tree: Any, part: Any, mask: Mask) -> Any:
    """`tree` with its trained leaves replaced by those of `part` (a select()-shaped tree)."""
    if mask is None:
        return part
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, tuple))
    new = iter(jax.tree.leaves(part, is_leaf=lambda x: isinstance(x, tuple)))
    keep = treedef.flatten_up_to(mask)
    return treedef.unflatten([next(new) if k else x for x, k in zip(leaves, keep)])


def count(tree: Any, mask: Mask) -> int:
    return sum(x.size for x in jax.tree.leaves(select(tree, mask)))
