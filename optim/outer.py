"""The outer step of training with replicas: DiLoCo, local SGD / FedAvg, FedProx, FedAdam / FedYogi, streaming.

R replicas each run H inner steps of the experiment's own optimizer from the same start (the anchor). Then the
outer gradient of replica r is `anchor - params_r`; their (weighted) mean goes through an Optax outer optimizer
and moves the anchor, and every replica restarts from it. The inner optimizer states persist across rounds.

    DiLoCo      outer "nesterov" (Douillard et al. 2023: lr 0.7, momentum 0.9, H 500 at scale)
    local SGD / FedAvg   outer "sgd", lr 1, momentum 0: the new anchor is the mean of the replicas
    FedProx     any of these with prox_mu > 0: the inner loss gains mu/2 ||params - anchor||^2
    FedAdam / FedYogi    outer "adam" / "yogi"

Streaming (fragments > 1): the parameters are split into fragments (strided layers, as Streaming DiLoCo does)
that synchronise on a staggered schedule, fragment f at steps where (step - f H / F) is a multiple of H, so the
bytes sent per sync are 1/F of a full one. Outer gradients may be sent in reduced precision (`send`): bfloat16,
or int8 / 4-bit with one float32 absmax scale per block of `quant_block` values.

Federated learning (clients > 0): a population of N clients, each holding a partition of the training data,
K = replicas of them sampled per round without replacement (data/partition.py). Differential privacy (dp_clip and
dp_noise) clips each client's outer gradient to norm C and adds Gaussian noise to their sum (optim/privacy.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

SendDtype = Literal["float32", "bfloat16", "int8", "int4"]


@dataclasses.dataclass(frozen=True)
class OuterConfig:
    replicas: int = 0  # R model replicas (K clients per round when federated); 0: synchronous training
    inner_steps: int = 50  # H: inner steps per round
    optimizer: Literal["nesterov", "sgd", "adam", "yogi"] = "nesterov"
    lr: float = 0.7
    momentum: float = 0.9  # nesterov / sgd momentum, adam / yogi b1; sgd with lr 1, momentum 0 is FedAvg
    b2: float = 0.99  # adam / yogi
    eps: float = 1e-3  # adam / yogi (FedAdam's tau; outer gradients are small, so larger than Adam's usual)
    prox_mu: float = 0.0  # FedProx: weight of mu/2 ||params - anchor||^2 in the inner loss
    fragments: int = 1  # streaming: the parameters synchronise in this many staggered fragments
    send: SendDtype = "float32"  # precision of the outer gradients each replica sends
    quant_block: int = 128  # int8 / int4: values sharing one absmax scale
    # federated: clients > 0 partitions the training data into that many clients (K = replicas of them a round)
    clients: int = 0
    partition: Literal["iid", "dirichlet", "source"] = "iid"  # source: one client per mixture source
    alpha: float = 0.1  # dirichlet: concentration; small is very non-IID
    partition_key: str = "source"  # dirichlet: "source" (the mixture's source) or a JSONL/Parquet field
    weighting: Literal["examples", "uniform"] = "examples"  # clients' weight in the mean (uniform under DP)
    # differential privacy per client: clip each outer gradient to dp_clip (L2), add N(0, (dp_noise 2 dp_clip)^2)
    # to their sum. dp_noise is the noise multiplier over the sum's sensitivity under replacing one client's
    # data (2 dp_clip), the relation of sampling a fixed number of clients without replacement.
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_delta: float = 1e-5

    def __post_init__(self):
        if self.replicas < 0:
            raise ValueError(f"outer.replicas must be >= 0 (0: synchronous training), got {self.replicas}")
        if self.inner_steps < 1:
            raise ValueError(f"outer.inner_steps must be >= 1 (inner steps per round), got {self.inner_steps}")
        if self.lr <= 0:
            raise ValueError(f"outer.lr must be positive, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"outer.momentum must be in [0, 1), got {self.momentum}")
        if self.prox_mu < 0 or self.dp_clip < 0 or self.dp_noise < 0:
            raise ValueError("outer.prox_mu, outer.dp_clip and outer.dp_noise must be >= 0")
        if self.fragments < 1:
            raise ValueError(f"outer.fragments must be >= 1, got {self.fragments}")
        if self.fragments > 1 and self.inner_steps % self.fragments:
            raise ValueError(f"outer.fragments ({self.fragments}) must divide outer.inner_steps "
                             f"({self.inner_steps}): fragment f synchronises f x H / fragments steps after the first")
        if self.quant_block < 2 or self.quant_block % 2:
            raise ValueError(f"outer.quant_block must be an even number >= 2, got {self.quant_block}")
        if (self.dp_clip > 0) != (self.dp_noise > 0):
            missing = "dp_noise (the noise multiplier)" if self.dp_clip > 0 else "dp_clip (the clipping norm)"
            raise ValueError(f"outer: differential privacy needs both dp_clip and dp_noise; set outer.{missing}")
        if not 0.0 < self.dp_delta < 1.0:
            raise ValueError(f"outer.dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.clients < 0 or (self.clients and self.clients < self.replicas):
            raise ValueError(f"outer.clients ({self.clients}) must be 0 or at least outer.replicas "
                             f"({self.replicas}): K = replicas clients train each round")
        if self.alpha <= 0:
            raise ValueError(f"outer.alpha must be positive, got {self.alpha}")
        unused = [f"outer.{k}" for k, on in (("clients", self.clients), ("prox_mu", self.prox_mu),
                                             ("fragments", self.fragments > 1), ("send", self.send != "float32"),
                                             ("dp_noise", self.dp_noise)) if on]
        if unused and not self.replicas:
            raise ValueError(f"{unused[0]} needs outer.replicas (the model copies that train between syncs); set "
                             "outer.replicas, or leave the outer section at its defaults for synchronous training")
        if self.private and not self.clients:
            raise ValueError("outer.dp_noise needs outer.clients: the privacy unit is a client's data, and without "
                             "clients a replica's rows are no one's in particular")
        if self.fragments > 1 and (self.clients or self.private):
            raise ValueError("outer.fragments > 1 does not combine with federated clients (a fragment's round would "
                             "span two rounds' clients, and DP would release each client F times a round); use "
                             "outer.fragments 1")

    @property
    def enabled(self) -> bool:
        return self.replicas > 0

    @property
    def private(self) -> bool:
        return self.dp_noise > 0

    @property
    def averages(self) -> bool:
        """Outer SGD at lr 1 without momentum is parameter averaging; it is computed as a mean, so one replica
        with H = 1 reproduces plain training bit for bit (anchor - (anchor - p) would round)."""
        return self.optimizer == "sgd" and self.lr == 1.0 and self.momentum == 0.0 and not self.private \
            and self.send == "float32"


def outer_optimizer(cfg: OuterConfig) -> optax.GradientTransformation:
    if cfg.optimizer == "nesterov":
        return optax.sgd(cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.lr, momentum=cfg.momentum or None)
    if cfg.optimizer == "adam":
        return optax.adam(cfg.lr, b1=cfg.momentum, b2=cfg.b2, eps=cfg.eps)
    return optax.yogi(cfg.lr, b1=cfg.momentum, b2=cfg.b2, eps=cfg.eps)


class OuterState(NamedTuple):
    """The optimizer state of a run with replicas (state['opt_state']); state['params'] is the anchor."""
    inner: Any  # the inner optimizer's state, a leading replica axis on every leaf
    replicas: Any  # the replicas' trainable parameters, (R, ...)
    outer: tuple  # the outer optimizer's state per fragment, over that fragment's list of pieces
    stats: dict  # figures of the last synchronisation (norms), so every step's metrics can report them
    secret: jax.Array  # DP: the noise's key data (uint32), drawn from os.urandom at the run's start, never in
    # the config (with train.seed anyone could regenerate the noise and subtract it); zeros without DP

    # The training loop reads the skipped-step counters of build_optimizer's chain from the state; here they
    # count over replicas (a replica's non-finite step is skipped by that replica alone).
    @property
    def notfinite_count(self):
        return jnp.max(self.inner.notfinite_count)

    @property
    def total_notfinite(self):
        return jnp.sum(self.inner.total_notfinite)


STATS = ("outer_grad_norm", "client_norm_max", "clipped_norm_max")


class Replicated(NamedTuple):
    """An Optax-style transformation whose init builds an OuterState: abstract_state, init_state and Orbax see
    an ordinary optimizer state. Updates are made by train/rounds.py, which calls `inner` and `outer` itself."""
    init: Any
    update: Any
    inner: optax.GradientTransformation
    outer: optax.GradientTransformation
    cfg: OuterConfig
    layered: Any  # per trainable leaf: whether its first axis stacks layers (nnx.scan): fragments split it

    def fragments(self, shapes: Any) -> list[list[Piece]]:
        return fragments(jax.tree.leaves(shapes), jax.tree.leaves(self.layered), self.cfg.fragments)


def layered(logical_axes: Any) -> Any:
    """True for each leaf whose first logical axis is 'layers' (scanned blocks), from ModelDef.logical_axes()."""
    return jax.tree.map(lambda axes: bool(axes) and axes[0] == "layers", logical_axes,
                        is_leaf=lambda x: isinstance(x, tuple))


def replicated(inner: optax.GradientTransformation, cfg: OuterConfig, layered: Any,
               secret: np.ndarray | None = None) -> Replicated:
    """`layered`: a tree like the trainable parameters of booleans, True where the first axis is 'layers'.
    `secret`: DP noise key data (uint32[2]) for a new run; a resumed run restores its own."""
    outer = outer_optimizer(cfg)
    r = cfg.replicas

    def init(params):
        stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (r, *x.shape)), tree)  # noqa: E731
        leaves = jax.tree.leaves(params)
        # the outer step runs in float32 whatever the parameters' dtype
        per_fragment = tuple(outer.init([piece_get(leaves[p.leaf], p).astype(jnp.float32) for p in pieces])
                             for pieces in tx.fragments(params))
        return OuterState(inner=stack(inner.init(params)), replicas=stack(params), outer=per_fragment,
                          stats={k: jnp.zeros((), jnp.float32) for k in STATS},
                          secret=jnp.asarray(np.zeros(2, np.uint32) if secret is None else secret, jnp.uint32))

    def update(*_):
        raise NotImplementedError("a replicated optimizer is stepped by train/rounds.py")

    tx = Replicated(init, update, inner, outer, cfg, layered)
    return tx


# --- what a replica sends: reduced precision, bytes -------------------------------------------------------------

def _blocks(x: jax.Array, block: int) -> jax.Array:
    flat = x.reshape(-1)
    pad = -flat.size % block
    return jnp.pad(flat, (0, pad)).reshape(-1, block)


def compress(x: jax.Array, send: SendDtype, block: int) -> dict[str, jax.Array]:
    """The payload a replica sends for one outer gradient leaf: {'values', 'scales'}. int4 packs two values into
    each byte, so the bytes on the wire are what `sent_bytes` counts."""
    if send == "float32":
        return {"values": x.astype(jnp.float32)}
    if send == "bfloat16":
        return {"values": x.astype(jnp.bfloat16)}
    levels = 127.0 if send == "int8" else 7.0
    b = _blocks(x.astype(jnp.float32), block)
    scales = jnp.max(jnp.abs(b), axis=1, keepdims=True) / levels
    q = jnp.clip(jnp.round(b / jnp.where(scales > 0, scales, 1.0)), -levels, levels).astype(jnp.int8)
    if send == "int4":
        nib = (q.astype(jnp.uint8) & 0xF).reshape(q.shape[0], -1, 2)
        q = (nib[..., 0] | (nib[..., 1] << 4)).astype(jnp.uint8)
    return {"values": q, "scales": scales[:, 0]}


def decompress(payload: dict[str, jax.Array], send: SendDtype, like: jax.ShapeDtypeStruct) -> jax.Array:
    values = payload["values"]
    if send in ("float32", "bfloat16"):
        return values.astype(jnp.float32)
    if send == "int4":
        low = (values & 0xF).astype(jnp.int8)
        high = (values >> 4).astype(jnp.int8)
        # 4-bit two's complement back to int8: values 8..15 are -8..-1
        low, high = (jnp.where(v > 7, v - 16, v) for v in (low, high))
        values = jnp.stack([low, high], axis=-1).reshape(values.shape[0], -1)
    deq = values.astype(jnp.float32) * payload["scales"][:, None]
    return deq.reshape(-1)[: math.prod(like.shape)].reshape(like.shape)


def sent_bytes(size: int, send: SendDtype, block: int) -> int:
    """Bytes on the wire for one leaf of `size` values."""
    if send == "float32":
        return 4 * size
    if send == "bfloat16":
        return 2 * size
    n_blocks = -(-size // block)
    per_block = block if send == "int8" else block // 2
    return n_blocks * (per_block + 4)


# --- streaming: fragments ----------------------------------------------------------------------------------------

class Piece(NamedTuple):
    """Part of one parameter leaf in a fragment: the whole leaf (layers None) or the layers l = start, start +
    step, ... of a stacked leaf (its leading axis)."""
    leaf: int
    start: int | None = None
    step: int = 1


def fragments(shapes: list[jax.ShapeDtypeStruct], layered: list[bool], n: int) -> list[list[Piece]]:
    """Pieces of each of n fragments. A leaf with stacked layers is split by layer (layer l in fragment l mod n,
    strided as in Streaming DiLoCo); other leaves go whole, by turns, to the fragment with the fewest values."""
    if n == 1:
        return [[Piece(i) for i in range(len(shapes))]]
    out: list[list[Piece]] = [[] for _ in range(n)]
    size = [0] * n
    for i, (s, k) in enumerate(zip(shapes, layered)):
        if k and s.shape[0] >= n:
            for f in range(n):
                out[f].append(Piece(i, f, n))
                size[f] += piece_size(s.shape, Piece(i, f, n))
    for i, (s, k) in enumerate(zip(shapes, layered)):
        if not (k and s.shape[0] >= n):
            f = int(np.argmin(size))
            out[f].append(Piece(i))
            size[f] += math.prod(s.shape)
    return out


def piece_get(x: jax.Array, piece: Piece, axis: int = 0) -> jax.Array:
    if piece.start is None:
        return x
    index = [slice(None)] * x.ndim
    index[axis] = slice(piece.start, None, piece.step)
    return x[tuple(index)]


def piece_set(x: jax.Array, piece: Piece, value: jax.Array, axis: int = 0) -> jax.Array:
    if piece.start is None:
        return value.astype(x.dtype)
    index = [slice(None)] * x.ndim
    index[axis] = slice(piece.start, None, piece.step)
    return x.at[tuple(index)].set(value.astype(x.dtype))


def piece_shape(shape: tuple[int, ...], piece: Piece) -> tuple[int, ...]:
    if piece.start is None:
        return tuple(shape)
    return (len(range(piece.start, shape[0], piece.step)), *shape[1:])


def piece_size(shape: tuple[int, ...], piece: Piece) -> int:
    return math.prod(piece_shape(shape, piece))


def sync_offsets(cfg: OuterConfig) -> list[int]:
    """Fragment f synchronises after the steps s (counted from 1) with s % H == offset_f: offset_0 = 0, so an
    unfragmented run syncs after steps H, 2H, ..., and fragment f first after f H / F steps."""
    return [f * cfg.inner_steps // cfg.fragments for f in range(cfg.fragments)]


def syncs_through(step: int, offset: int, h: int) -> int:
    """How many times a fragment with this offset has synchronised after `step` steps."""
    return (step + (h - offset) % h) // h
