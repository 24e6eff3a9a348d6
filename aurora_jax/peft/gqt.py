"""Gated Query Transformation: a fixed 0.1 gate on learnable per-channel affines of h_s and h_x."""

from __future__ import annotations

import jax

from aurora_jax.peft.initializers import normal_many
from aurora_jax.peft.sites import gqt_layers, set_path

Array = jax.Array
GQT_STD = 2e-4
GQT_NAMES = ("a_s", "b_s", "a_x", "b_x")


def init_gqt(params: dict, rng: Array) -> dict:
    """a_s, b_s, a_x, b_x ~ normal(0, 2e-4) per BERT layer with cross-attention, nested by layer path."""
    layers = sorted(gqt_layers(params).items())
    drawn = iter(normal_many(rng, [(width,) for _, width in layers for _ in GQT_NAMES], GQT_STD))
    tree: dict = {}
    for path, _ in layers:
        set_path(tree, path, {name: next(drawn) for name in GQT_NAMES})
    return tree


def gated_query_transform(
    ffn_out: Array, h_s: Array, h_x: Array, g: dict[str, Array], weight: float = 0.1
) -> Array:
    """FFN_block(h_x) + w (a_s h_s + b_s) + w (a_x h_x + b_x): no sigmoid, the gate is the constant w."""
    term = weight * (g["a_s"] * h_s + g["b_s"]) + weight * (g["a_x"] * h_x + g["b_x"])
    return ffn_out + term.astype(ffn_out.dtype)
