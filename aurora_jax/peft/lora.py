"""LoRA on any Dense: y + (alpha / r) * B(A(drop(x))), as HF peft computes it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from aurora_jax.peft.sites import lora_sites, set_path

Array = jax.Array


def init_lora_site(rng: Array, fan_in: int, fan_out: int, r: int) -> dict[str, Array]:
    """A (in, r) ~ U(+-1/sqrt(in)) (kaiming-uniform with a=sqrt(5), as torch/peft), B (r, out) = 0."""
    bound = 1.0 / math.sqrt(fan_in)
    return {"A": jax.random.uniform(rng, (fan_in, r), jnp.float32, -bound, bound),
            "B": jnp.zeros((r, fan_out), jnp.float32)}


def init_lora(params: dict, rng: Array, *, r: int, targets: str | Sequence[str]) -> dict:
    """{<Dense path>: {A, B}} for the Dense layers that `targets` selects."""
    sites = lora_sites(params, targets)
    if not sites:
        raise ValueError(f"lora_targets={targets!r} selects no Dense of the base model")
    tree: dict = {}
    for key, path in zip(jax.random.split(rng, len(sites)), sorted(sites), strict=True):
        set_path(tree, path, init_lora_site(key, *sites[path], r))
    return tree


def lora_delta(
    x: Array, A: Array, B: Array, scale: float, drop: Callable[[Array], Array] = lambda t: t
) -> Array:
    """scale * B(A(drop(x))), on activations."""
    return (drop(x) @ A @ B) * scale
