"""Client-level differential privacy for federated rounds (DP-FedAvg, McMahan et al. 2018).

Each sampled client's outer gradient (anchor - its parameters after the round) is clipped to L2 norm C; the server
adds Gaussian noise of standard deviation z x 2C to the sum and divides by the fixed number of clients K. Clients
are sampled K of N without replacement, so the neighbouring relation is "replace one client's data" and the
sum's sensitivity is 2C: z is the noise multiplier the accountant sees. The privacy spent after each round is
computed by Google's dp-accounting (Renyi DP of the subsampled Gaussian, Wang, Balle & Kasiviswanathan 2019).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from parallel.errors import UserError


def clip_each(deltas_R, clip: float):
    """Each replica's tree scaled to global L2 norm <= clip; also the norms before clipping, (R,)."""
    norms_R = jax.vmap(optax.tree.norm)(deltas_R)
    scale_R = jnp.minimum(1.0, clip / jnp.maximum(norms_R, 1e-12))
    return jax.tree.map(lambda d: d * scale_R.reshape(-1, *([1] * (d.ndim - 1))), deltas_R), norms_R


def noised_mean(sum_tree, key: jax.Array, clip: float, noise: float, clients: int):
    """(sum + N(0, (noise 2 clip)^2)) / clients, a fresh normal draw per leaf."""
    leaves, treedef = jax.tree.flatten(sum_tree)
    keys = jax.random.split(key, len(leaves))
    std = noise * 2.0 * clip
    noisy = [(x + std * jax.random.normal(k, x.shape, jnp.float32)) / clients for x, k in zip(leaves, keys)]
    return treedef.unflatten(noisy)


def dp_event(noise: float, clients: int, population: int):
    """The DpEvent of one round: K of N clients sampled without replacement (or all of them), Gaussian noise."""
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise)
    if clients >= population:
        return gaussian
    return dp_accounting.SampledWithoutReplacementDpEvent(population, clients, gaussian)


def epsilons(noise: float, clients: int, population: int, rounds: int, delta: float) -> np.ndarray:
    """Epsilon at `delta` after rounds 1..rounds (index r-1), Renyi DP accounting. Renyi DP adds up over
    rounds, so one round's is computed once (composing the sampled event again would redo that work every
    round, the slow part of the accounting)."""
    check_installed()
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_event(noise, clients, population))
    orders, one_round = np.asarray(accountant._orders), np.asarray(accountant._rdp)  # (no public getter)
    return np.array([compute_epsilon(orders, k * one_round, delta)[0] for k in range(1, rounds + 1)])


def check_installed() -> None:
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise UserError("outer.dp_noise: privacy accounting needs dp-accounting; pip install 'meshforge[federated]'") \
            from None
