"""Initialisation helpers: many small leaves from ONE random draw.

threefry is expensive to compile on CPU (seconds per distinct call under jit); an adapter has dozens of
small leaves, so drawing them separately made `init_adapter` compile for ~10 s. One draw, sliced, keeps
the distributions and costs one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def _split(flat: Array, shapes: Sequence[tuple[int, ...]]) -> list[Array]:
    out, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[start:start + n].reshape(shape))
        start += n
    return out


def uniform_many(rng: Array, shapes: Sequence[tuple[int, ...]], bounds: Sequence[float]) -> list[Array]:
    """Leaf i ~ U(-bounds[i], bounds[i]) with shape shapes[i]."""
    flat = jax.random.uniform(rng, (sum(math.prod(s) for s in shapes),), jnp.float32, -1.0, 1.0)
    return [x * b for x, b in zip(_split(flat, shapes), bounds, strict=True)]


def normal_many(rng: Array, shapes: Sequence[tuple[int, ...]], std: float) -> list[Array]:
    """Every leaf ~ N(0, std^2)."""
    flat = jax.random.normal(rng, (sum(math.prod(s) for s in shapes),), jnp.float32)
    return [x * std for x in _split(flat, shapes)]
