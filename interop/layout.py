"""Reading and writing one meshforge parameter as a view of HF tensors (a families.Tensor row).

Import reads any box of the meshforge parameter (the slice one device holds) by reading, from each HF tensor,
only the bounding range of the rows and columns that box needs. Export scatters full host arrays into HF tensors.
Both go through the same per-factor index arithmetic, so a table row means the same thing in both directions.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import jax
import numpy as np

from interop.families import Tensor


def parse_src(spec: str) -> list[list[str]]:
    """'d (c n h)' -> [['d'], ['c', 'n', 'h']]: each HF axis as the factors it packs, major first."""
    axes, group = [], None
    for tok in spec.replace("(", " ( ").replace(")", " ) ").split():
        if tok == "(":
            group = []
        elif tok == ")":
            axes.append(group)
            group = None
        elif group is not None:
            group.append(tok)
        else:
            axes.append([tok])
    return axes


def interleave_perm(h: int) -> np.ndarray:
    """Row j of the rotate-half layout is row perm[j] of the interleaved one: halves (i, i + h/2) come from pairs
    (2i, 2i + 1)."""
    return np.concatenate([np.arange(0, h, 2), np.arange(1, h, 2)])


@dataclasses.dataclass(frozen=True)
class View:
    """A table row bound to one model: factor sizes, the meshforge shape, and which layer(s) it covers."""
    row: Tensor
    sizes: dict[str, int]  # source-side factor sizes (families.factor_sizes)
    shape: tuple[int, ...]  # the meshforge parameter's shape, with a leading L when layers are stacked
    layer: int | None  # the layer of an unstacked block parameter; None when stacked or outside the blocks
    stacked: bool = False
    interleaved: bool = False

    @property
    def dst(self) -> list[str]:
        return (["l"] if self.stacked else []) + self.row.dst.split()

    @property
    def src(self) -> list[list[str]]:
        return parse_src(self.row.src)

    def src_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(self.sizes[f] for f in axis) for axis in self.src)

    def name(self, layer: int | None, s: int) -> str:
        return self.row.hf[s].format(i=layer)

    def names(self) -> list[str]:
        layers = range(self.shape[0]) if self.stacked else [self.layer]
        return [self.name(i, s) for i in layers for s in range(len(self.row.hf))]

    def outer(self) -> list[str]:
        """Factors taken one index at a time: layers and stacked tensors (each its own HF tensor), and the factor
        that decides whether RoPE rows are permuted."""
        rope = self.row.rope
        cond = [rope[0]] if self.interleaved and isinstance(rope, tuple) else []
        return [f for f in self.dst if f in ("l", "s") or f in cond]

    def indices(self, rng: dict[str, np.ndarray], fixed: dict[str, int]):
        """Per HF axis: flat source index of every element of the target box (row-major over its factors) and
        whether it exists there (False: padding, e.g. vocabulary rows past the real size); and per source
        factor the number of target indices."""
        offset = dict(self.row.offset)
        rope = self.row.rope
        rotated = self.interleaved and (rope is True or (isinstance(rope, tuple) and fixed.get(rope[0]) == rope[1]))
        flat, valid, lens = [], [], {}
        for axis in self.src:
            idx = []
            for f in axis:
                tgt = np.array([fixed[f]]) if f in fixed else rng.get(f, np.zeros(1, np.int64))
                src = tgt + offset.get(f, 0)
                if f == "h" and rotated:
                    src = interleave_perm(self.sizes["h"])[tgt]
                idx.append(src)
                lens[f] = len(tgt)
            strides = [math.prod(self.sizes[g] for g in axis[j + 1:]) for j in range(len(axis))]
            grids = np.meshgrid(*idx, indexing="ij")
            ok = np.ones(grids[0].shape, bool)
            for f, g in zip(axis, grids):
                ok &= g < self.sizes[f]
            flat.append(sum(g * st for g, st in zip(grids, strides)).reshape(-1))
            valid.append(ok.reshape(-1))
        return flat, valid, lens

    def inner_order(self, fixed: dict[str, int]) -> list[str]:
        return [f for f in self.dst if f not in fixed and f not in ("l", "s")]

    def to_dst(self, block: np.ndarray, lens: dict[str, int], fixed: dict[str, int]) -> np.ndarray:
        """(source factors, row-major) -> the meshforge box without its outer factors."""
        factors = [f for axis in self.src for f in axis]
        block = block.reshape([lens[f] for f in factors])
        inner = self.inner_order(fixed)
        keep = [f for f in factors if f in inner]
        block = block.reshape([lens[f] for f in keep])  # drop selector factors (one index each)
        block = block.transpose([keep.index(f) for f in inner if f != "1"])
        return block.reshape([1 if f == "1" else lens[f] for f in inner])

    def to_src(self, block: np.ndarray, lens: dict[str, int], fixed: dict[str, int]) -> np.ndarray:
        """Inverse of to_dst: the meshforge box (without outer factors) as (HF axes) of flattened factor grids."""
        inner = [f for f in self.inner_order(fixed) if f != "1"]
        block = block.reshape([lens[f] for f in inner])
        factors = [f for axis in self.src for f in axis]
        keep = [f for f in factors if f in inner]
        block = block.transpose([inner.index(f) for f in keep])
        return block.reshape([math.prod(lens[f] for f in axis) for axis in self.src])

    def ranges(self, box: tuple[slice, ...]) -> dict[str, np.ndarray]:
        """Target indices per meshforge factor in a box (the unit factor '1' has index 0)."""
        rng = {f: np.arange(*box[j].indices(self.shape[j])) for j, f in enumerate(self.dst)}
        return {**rng, "1": np.zeros(1, np.int64)}

    def combos(self, rng: dict[str, np.ndarray]):
        """Each combination of the outer factors' indices, as {factor: index}."""
        outer = self.outer()
        for combo in itertools.product(*(rng[f] for f in outer)):
            yield dict(zip(outer, (int(c) for c in combo)))

    def read(self, box: tuple[slice, ...], get: Callable[[str, tuple[slice, ...]], np.ndarray],
             dtype) -> np.ndarray:
        """The meshforge parameter's values in `box`; get(name, slices) reads part of an HF tensor."""
        dst, outer, rng = self.dst, self.outer(), self.ranges(box)
        out = np.zeros([len(rng[f]) for f in outer] + [len(rng[f]) for f in dst if f not in outer], dtype)
        for fixed in self.combos(rng):
            flat, valid, lens = self.indices(rng, fixed)
            if not all(v.any() for v in valid):
                continue  # all padding
            lo = [int(f[v].min()) for f, v in zip(flat, valid)]
            hi = [int(f[v].max()) + 1 for f, v in zip(flat, valid)]
            block = np.asarray(get(self.name(fixed.get("l", self.layer), fixed.get("s", 0)),
                                    tuple(slice(a, b) for a, b in zip(lo, hi))))
            for a, (f, v, start) in enumerate(zip(flat, valid, lo)):
                block = np.take(block, np.where(v, f - start, 0), axis=a)
            n = len(valid)  # zero the padding: the product of the per-axis masks
            mask = functools.reduce(np.logical_and, (v.reshape([-1 if a == j else 1 for a in range(n)])
                                                     for j, v in enumerate(valid)))
            block = np.where(mask, block, 0)
            pos = tuple(int(np.searchsorted(rng[f], fixed[f])) for f in outer)
            out[pos] = self.to_dst(block, lens, fixed).astype(dtype)
        # outer factors first -> their places in the meshforge order
        return np.moveaxis(out, list(range(len(outer))), [dst.index(f) for f in outer])

    def write(self, value: np.ndarray, put: Callable[[str], np.ndarray]) -> None:
        """Scatter a full meshforge parameter into its HF tensors; put(name) is that tensor's (zeroed) buffer."""
        dst, outer = self.dst, self.outer()
        value = np.moveaxis(value, [dst.index(f) for f in outer], list(range(len(outer))))
        rng = self.ranges(tuple(slice(None) for _ in dst))
        for fixed in self.combos(rng):
            flat, valid, lens = self.indices(rng, fixed)
            sub = value[tuple(fixed[f] for f in outer)]
            block = self.to_src(sub, lens, fixed)
            buf = put(self.name(fixed.get("l", self.layer), fixed.get("s", 0)))
            buf[np.ix_(*(f[v] for f, v in zip(flat, valid)))] = block[np.ix_(*(np.nonzero(v)[0] for v in valid))]


def bind(fam_tensors: tuple[Tensor, ...], sizes: dict[str, int], shapes: dict, *, stacked: bool,
         interleaved: bool = False) -> dict[str, View]:
    """A View per meshforge parameter path ('blocks/0/attn/wq_DNH', or 'blocks/attn/wq_DNH' when the layers are
    stacked) that the table covers. `shapes`: the pure-dict parameter tree (anything with .shape as leaves)."""
    rows = {r.path: r for r in fam_tensors}
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        parts = [str(getattr(k, "key", k)) for k in path]
        key, layer = "/".join(parts), None
        if parts[0] == "blocks" and stacked:
            pattern = "/".join(["blocks", "{i}", *parts[1:]])
        elif parts[0] == "blocks":
            pattern, layer = "/".join(["blocks", "{i}", *parts[2:]]), int(parts[1])
        else:
            pattern = key
        if pattern not in rows:
            continue
        view = View(rows[pattern], sizes, tuple(leaf.shape), layer, stacked and parts[0] == "blocks", interleaved)
        check_extents(view, key)
        out[key] = view
    return out


def check_extents(view: View, key: str) -> None:
    """The model's parameter shape is the one the table row implies (a bug here, not a user error)."""
    dst = view.dst
    if len(dst) != len(view.shape):
        raise ValueError(f"{key}: shape {view.shape} has not the axes {' '.join(dst)} of its family table row")
    for f, n in zip(dst, view.shape):
        want = {"1": 1, "s": len(view.row.hf)}.get(f, view.sizes.get(f))
        if f in ("l", "c") or (f == "v" and n >= view.sizes["v"]):
            continue
        if n != want:
            raise ValueError(f"{key}: axis {f} is {n} in the model but {want} in the family table")
