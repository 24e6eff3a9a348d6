"""Tiny BLIP configs, inputs and adapter helpers shared by the PEFT tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.models.bert import BertConfig
from aurora_jax.models.blip import BlipConfig, abstract_params
from aurora_jax.models.vit import ViTConfig

TINY_VIT = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=128)
TINY_BERT = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position_embeddings=16, encoder_width=32)
TINY_RETRIEVAL = BlipConfig(vision=TINY_VIT, text=TINY_BERT, task="retrieval", embed_dim=16)
TINY_VQA = BlipConfig(vision=TINY_VIT, text=TINY_BERT, task="vqa", embed_dim=16)
RANK = 4


def fast_init(cfg: BlipConfig, seed: int) -> dict:
    """Random BLIP params from the abstract tree with numpy: no compile of the model's init (slow on 2 CPUs).

    Kernels/embeddings ~ N(0, 0.02) as the model's init; norms get random scales and biases so the
    parity tests also see non-trivial LayerNorms.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.normal(size=x.shape), x.dtype)
        if name == "temp":
            return jnp.full(x.shape, cfg.temp, x.dtype)
        std = 0.1 if name == "bias" else 0.02
        return jnp.asarray(std * rng.normal(size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def inputs(seed: int = 0):
    """pixels (2, 32, 32, 3), ids (2, 6) with padding, mask."""
    rng = np.random.default_rng(seed)
    pixels = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    ids = jnp.asarray([[1, 5, 7, 9, 11, 2], [1, 3, 4, 2, 0, 0]], jnp.int32)
    return pixels, ids, (ids > 0).astype(jnp.int32)


def randomize(adapter: dict, seed: int = 0, v_std: float = 0.5, gqt_std: float = 0.5) -> dict:
    """A trained-looking adapter: V (or LoRA's B) and GQT far from their (near-)zero inits."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        names = [getattr(p, "key", None) for p in path]
        if names[-1] in ("V", "B"):
            return jnp.asarray(v_std * rng.normal(size=x.shape), x.dtype)
        if names[0] == "gqt":
            return jnp.asarray(gqt_std * rng.normal(size=x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(fill, adapter)


def without_gqt(adapter: dict) -> dict:
    return {k: v for k, v in adapter.items() if k != "gqt"}


def zero_gqt(adapter: dict) -> dict:
    out = dict(adapter)
    if "gqt" in out:
        out["gqt"] = jax.tree_util.tree_map(jnp.zeros_like, out["gqt"])
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def shapes_of(tree) -> list:
    return [tuple(x.shape) for x in jax.tree_util.tree_leaves(tree)]
