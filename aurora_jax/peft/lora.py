"""LoRA on any Dense: y + (alpha / r) * B(A(drop(x))), as HF peft computes it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from aurora_jax.peft.initializers import uniform_many
from aurora_jax.peft.sites import lora_sites, set_path

Array = jax.Array


def init_lora(params: dict, rng: Array, *, r: int, targets: str | Sequence[str]) -> dict:
    """{<Dense path>: {A, B}} for the Dense layers that `targets` selects.

    A (in, r) ~ U(+-1/sqrt(in)) (kaiming-uniform with a=sqrt(5), as torch/peft); B (r, out) = 0.
    """
    sites = lora_sites(params, targets)
    if not sites:
        raise ValueError(f"lora_targets={targets!r} selects no Dense of the base model")
    paths = sorted(sites)
    fan_in = [sites[p][0] for p in paths]
    drawn = uniform_many(rng, [(n, r) for n in fan_in], [1.0 / math.sqrt(n) for n in fan_in])
    tree: dict = {}
    for path, A in zip(paths, drawn, strict=True):
        set_path(tree, path, {"A": A, "B": jnp.zeros((r, sites[path][1]), jnp.float32)})
    return tree


def lora_delta(
    x: Array, A: Array, B: Array, scale: float, drop: Callable[[Array], Array] = lambda t: t
) -> Array:
    """scale * B(A(drop(x))), on activations."""
    return (drop(x) @ A @ B) * scale
