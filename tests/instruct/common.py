"""Tiny Owl / Owl2 configs, random params, prompts and randomised adapters shared by the instruct tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.models.abstractor import AbstractorConfig
from aurora_jax.models.llama import LlamaConfig
from aurora_jax.models.owl import OwlConfig, owl_vit_config
from aurora_jax.tasks import instruct as task
from aurora_jax.train.instruct import random_params

IMG, PATCH, D_VIT, QUERIES = 16, 8, 16, 4
K = QUERIES + 1  # visual tokens per image
VOCAB = 48


def tiny_owl(version: int = 2, *, remat: bool = False) -> OwlConfig:
    """Owl2: modality-adaptive LLM with GQA (k/v 32 -> 16) and a non-square MLP (32 -> 48 -> 32)."""
    llm = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2 if version == 2 else 4, modality_adaptive=version == 2, remat=remat)
    return OwlConfig(
        version=version,
        vision=owl_vit_config(IMG, patch_size=PATCH, hidden_size=D_VIT, num_heads=2, mlp_dim=32, num_layers=1),
        abstractor=AbstractorConfig(version=version, hidden_size=D_VIT, num_layers=1, num_heads=2,
                                    intermediate_size=24, num_queries=QUERIES, output_size=32,
                                    grid_size=IMG // PATCH),
        llm=llm,
    )


def params_for(cfg: OwlConfig, seed: int = 0) -> dict:
    return jax.tree_util.tree_map(jnp.asarray, random_params(cfg, seed))


def prompts(version: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Two left-padded prompts (lengths 9 + image and 4 + image), one image each."""
    rng = np.random.default_rng(seed)
    ph = task.IMAGE_PLACEHOLDER_ID[version]
    rows = [[1, *rng.integers(3, VOCAB, 3)] + [ph] * K + list(rng.integers(3, VOCAB, 5)),
            [1] + [ph] * K + list(rng.integers(3, VOCAB, 3))]
    exs = [task.Example(np.asarray(r, np.int32), np.asarray(r, np.int32) * 0, (np.asarray(r) < 0).astype(np.int32))
           for r in rows]
    b = task.collate(exs, 0, side="left")
    pixels = rng.normal(size=(2, IMG, IMG, 3)).astype(np.float32)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "pixels": pixels}


def randomize(adapter: dict, seed: int = 0, std: float = 0.3) -> dict:
    """Every adapter leaf random (V and B included), so each term of the delta matters."""
    leaves, tree = jax.tree_util.tree_flatten(adapter)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        tree, [jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) for x in leaves])
