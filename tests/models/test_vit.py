"""mPLUG-Owl's ViT-L layout vs a small torch reference written from the release."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import torch

from aurora_jax.convert.keymap import KeyMap
from aurora_jax.convert.owl import vit_rules
from aurora_jax.models.owl import owl_vit_config
from aurora_jax.models.vit import VisionTransformer
from tests.fixtures import abstract_init, convert_sd, randomize_norms, rel_err, t2n
from tests.models.owl_torch_ref import RefViT

TOL = 1e-5


def test_owl_vit_layout_vs_torch_reference():
    """Per-head fused qkv, QuickGELU, bias-free patch conv, pre-LN after embeddings, post-LN on all tokens."""
    torch.manual_seed(0)
    ref = RefViT(d=32, heads=2, mlp=64, layers=2, patch=4, image_size=16).eval()
    randomize_norms(ref)
    cfg = owl_vit_config(16, patch_size=4, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)
    pixels = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
    model = VisionTransformer(cfg)
    params = convert_sd(KeyMap(vit_rules(cfg, src="", dst="")), ref.state_dict(), abstract_init(model, pixels))
    got = model.apply({"params": params}, jnp.asarray(pixels))
    with torch.no_grad():
        want = t2n(ref(torch.tensor(pixels).permute(0, 3, 1, 2)))
    err = rel_err(got, want)
    print(f"Owl ViT layout rel err: {err:.2e}")
    assert got.shape == (2, 17, 32) and err < TOL
    # The per-head layout matters: reading the same weights as [q | k | v] chunks gives another function.
    chunked = VisionTransformer(dataclasses.replace(cfg, qkv_layout="qkv"))
    assert rel_err(chunked.apply({"params": params}, jnp.asarray(pixels)), want) > 1e-3
