"""Gated Query Transformation: a fixed 0.1 gate on learnable per-channel affines of h_s and h_x."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aurora_jax.peft.sites import gqt_layers, set_path

Array = jax.Array
GQT_STD = 2e-4


def init_gqt_layer(rng: Array, width: int) -> dict[str, Array]:
    """a_s, b_s, a_x, b_x ~ normal(0, 2e-4)."""
    keys = jax.random.split(rng, 4)
    return {n: GQT_STD * jax.random.normal(k, (width,), jnp.float32)
            for n, k in zip(("a_s", "b_s", "a_x", "b_x"), keys, strict=True)}


def init_gqt(params: dict, rng: Array) -> dict:
    """One GQT set per BERT layer that has cross-attention, nested by layer path."""
    layers = gqt_layers(params)
    tree: dict = {}
    for i, path in enumerate(sorted(layers)):
        set_path(tree, path, init_gqt_layer(jax.random.fold_in(rng, i), layers[path]))
    return tree


def gated_query_transform(
    ffn_out: Array, h_s: Array, h_x: Array, g: dict[str, Array], weight: float = 0.1
) -> Array:
    """FFN_block(h_x) + w (a_s h_s + b_s) + w (a_x h_x + b_x): no sigmoid, the gate is the constant w."""
    term = weight * (g["a_s"] * h_s + g["b_s"]) + weight * (g["a_x"] * h_x + g["b_x"])
    return ffn_out + term.astype(ffn_out.dtype)
