"""Counter-based randomness: a uniform number for any tuple of integers, without state.

Random choices in batches (masking, mixture order, permutations) are functions of (seed, position, ...), so
they come out the same on any host, in any order, after any restart. splitmix64's finaliser mixes the keys.
`digest` is the content hash that names caches and fingerprints data.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser. uint64 arithmetic wraps; callers with 0-d inputs silence numpy's overflow warning."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def hash64(*keys) -> np.ndarray:
    """uint64 hash of integer keys (arrays broadcast together)."""
    h = np.zeros((), np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = mix64(h ^ (np.asarray(k).astype(np.uint64) + _GOLDEN))
    return h


def uniform(*keys) -> np.ndarray:
    """Floats in [0, 1), one per broadcast element of the keys."""
    return (hash64(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def digest(obj) -> str:
    """16 hex digits of the sha256 of obj's JSON (keys sorted): cache names and fingerprints. Never change it:
    every existing cache is named by it."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
