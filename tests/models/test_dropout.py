"""Training-time regularisation as the release trains: BERT attention-probability dropout and ViT stochastic depth.

Small float32 PyTorch references written from the release's description (Salesforce BLIP models/med.py
BertSelfAttention / BertSelfOutput; timm's DropPath in WillDreamer/Aurora CP/vit.py Block), with the dropout
masks fixed: the JAX modules draw theirs through `layers.keep_mask`, which the tests replace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aurora_jax.models import layers
from aurora_jax.models.bert import BertAttentionBlock, BertConfig
from aurora_jax.models.vit import VisionTransformer, ViTBlock, ViTConfig
from tests.fixtures import rel_err

TOL = 1e-5
B, T, S, D, HEADS = 2, 5, 7, 16, 4


def _randomized(params: dict, seed: int) -> dict:
    """Every leaf redrawn (norm scales around 1), so that nothing is trivially zero or one."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + 0.3 * rng.standard_normal(x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, layers.unbox(params))


class FixedMasks:
    """Stand-in for `layers.keep_mask`: hands out the given masks in call order, recording the rates asked for."""

    def __init__(self, masks):
        self.masks, self.rates = list(masks), []

    def __call__(self, module, rate, shape):
        self.rates.append(rate)
        mask = self.masks.pop(0)
        assert mask.shape == tuple(shape)
        return jnp.asarray(mask)


def _lin(p: dict, x: torch.Tensor) -> torch.Tensor:
    return x @ torch.tensor(np.asarray(p["kernel"])) + torch.tensor(np.asarray(p["bias"]))


def _ln(p: dict, x: torch.Tensor, eps: float) -> torch.Tensor:
    w, b = torch.tensor(np.asarray(p["scale"])), torch.tensor(np.asarray(p["bias"]))
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)


def torch_bert_attention(p: dict, x, kv, key_mask, keep, rate: float, heads: int, eps: float) -> torch.Tensor:
    """med.py: scores = QK^T / sqrt(h) + (1 - mask) * -10000, softmax, dropout (fixed mask), @ V, dense, LN(+ x)."""
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)

    q, k, v = split(_lin(p["query"], x)), split(_lin(p["key"], kv)), split(_lin(p["value"], kv))
    scores = q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1])
    scores = scores + (1.0 - key_mask[:, None, None, :]) * -10000.0
    probs = torch.softmax(scores, dim=-1) * keep / (1.0 - rate)  # nn.Dropout with its mask fixed
    ctx = (probs @ v).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    return _ln(p["out_norm"], _lin(p["out"], ctx) + x, eps)


@pytest.mark.parametrize("cross", [False, True])
def test_bert_attention_probability_dropout_vs_torch(monkeypatch, cross):
    rate = 0.3
    cfg = BertConfig(hidden_size=D, num_heads=HEADS, encoder_width=D, attention_dropout=rate)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    kv = rng.standard_normal((B, S, D)).astype(np.float32) if cross else x
    key_mask = np.ones((B, kv.shape[1]), np.float32)
    key_mask[1, -2:] = 0  # padded keys
    keep = rng.random((B, HEADS, T, kv.shape[1])) > rate
    block = BertAttentionBlock(cfg, D)
    mask = layers.padding_mask(jnp.asarray(key_mask))
    params = _randomized(block.init(jax.random.key(0), x, kv, mask)["params"], 2)
    fixed = FixedMasks([keep])
    monkeypatch.setattr(layers, "keep_mask", fixed)
    got = block.apply({"params": params}, x, kv, mask, deterministic=False, rngs={"dropout": jax.random.key(3)})
    want = torch_bert_attention(params, torch.tensor(x), torch.tensor(kv), torch.tensor(key_mask),
                                torch.tensor(keep, dtype=torch.float32), rate, HEADS, cfg.eps)
    err = rel_err(got, want.numpy())
    print(f"BERT attention with probability dropout rel err: {err:.2e}")
    assert err < TOL and fixed.rates == [rate]
    # Evaluation: the same block is the fused attention, and it matches the reference without dropout.
    ones = torch.ones(keep.shape)
    evaluated = block.apply({"params": params}, x, kv, mask)
    assert rel_err(evaluated, torch_bert_attention(params, torch.tensor(x), torch.tensor(kv), torch.tensor(key_mask),
                                                   ones, 0.0, HEADS, cfg.eps).numpy()) < TOL


@pytest.mark.parametrize(("rate", "deterministic", "fused"), [
    (0.1, False, False),  # training with dropout: softmax, dropout on the probabilities, @ V
    (0.1, True, True),  # evaluation
    (0.0, False, True),  # training without attention dropout
])
def test_fused_attention_unless_training_with_dropout(monkeypatch, rate, deterministic, fused):
    cfg = BertConfig(hidden_size=D, num_heads=HEADS, encoder_width=D, attention_dropout=rate)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D)), jnp.float32)
    block = BertAttentionBlock(cfg, D)
    params = block.init(jax.random.key(0), x, x, None)["params"]
    calls = []
    fused_fn = layers.dot_product_attention
    monkeypatch.setattr(layers, "dot_product_attention", lambda *a, **k: calls.append(1) or fused_fn(*a, **k))

    def run(x):
        return block.apply({"params": params}, x, x, None, deterministic=deterministic,
                           rngs={"dropout": jax.random.key(1)})

    jaxpr = str(jax.make_jaxpr(run)(x))
    assert bool(calls) == fused
    assert ("random_bits" in jaxpr) != fused  # no dropout draw at all on the fused path


def torch_vit_block(p: dict, x: torch.Tensor, keeps, rate: float, heads: int, eps: float) -> torch.Tensor:
    """Pre-LN ViT block with timm's DropPath on both residual branches (per-sample flags fixed)."""
    def drop_path(h, keep):
        return h * (keep.view(-1, 1, 1) / (1.0 - rate))

    b, n, d = x.shape
    h = _ln(p["norm1"], x, eps)
    qkv = _lin(p["attn"]["qkv"], h).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / np.sqrt(d // heads), dim=-1)
    a = _lin(p["attn"]["proj"], (attn @ qkv[2]).transpose(1, 2).reshape(b, n, d))
    x = x + drop_path(a, keeps[0])
    h = _lin(p["mlp"]["fc2"], torch.nn.functional.gelu(_lin(p["mlp"]["fc1"], _ln(p["norm2"], x, eps))))
    return x + drop_path(h, keeps[1])


def test_vit_drop_path_vs_torch(monkeypatch):
    rate = 0.4
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=D, num_layers=1, num_heads=HEADS, mlp_dim=4 * D)
    x = np.random.default_rng(0).standard_normal((4, 5, D)).astype(np.float32)
    keeps = [np.array([True, False, True, True]), np.array([False, True, True, False])]
    block = ViTBlock(cfg, rate)
    params = _randomized(block.init(jax.random.key(0), x)["params"], 1)
    fixed = FixedMasks(keeps)
    monkeypatch.setattr(layers, "keep_mask", fixed)
    got = block.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    want = torch_vit_block(params, torch.tensor(x), [torch.tensor(k, dtype=torch.float32) for k in keeps], rate,
                           HEADS, cfg.eps)
    err = rel_err(got, want.numpy())
    print(f"ViT block with drop path rel err: {err:.2e}")
    assert err < TOL and fixed.rates == [rate, rate]
    # Evaluation: no drop, no scaling.
    ones = [torch.ones(4), torch.ones(4)]
    assert rel_err(block.apply({"params": params}, x), torch_vit_block(params, torch.tensor(x), ones, 0.0, HEADS,
                                                                        cfg.eps).numpy()) < TOL


def test_vit_drop_path_schedule_is_timms(monkeypatch):
    """dpr = linspace(0, rate, depth): block 0 never drops; active only when not deterministic."""
    np.testing.assert_allclose(layers.drop_path_rates(0.1, 12), torch.linspace(0, 0.1, 12).tolist(), rtol=1e-6)
    assert layers.drop_path_rates(0.1, 1) == [0.0]
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=D, num_layers=3, num_heads=HEADS, mlp_dim=4 * D,
                    drop_path=0.2)
    pixels = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
    model = VisionTransformer(cfg)
    params = model.init(jax.random.key(0), pixels)["params"]
    fixed = FixedMasks([np.ones(2, bool)] * 4)
    monkeypatch.setattr(layers, "keep_mask", fixed)
    model.apply({"params": params}, pixels)
    assert fixed.rates == []  # deterministic by default (evaluation, and every caller that does not train)
    model.apply({"params": params}, pixels, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_allclose(fixed.rates, [0.1, 0.1, 0.2, 0.2], rtol=1e-6)  # blocks 1, 2: attention and MLP
    with pytest.raises(ValueError, match="drop_path"):
        ViTConfig(drop_path=1.0)


def test_remat_draws_the_same_masks():
    """configs/vqa.py trains with remat: stochastic depth and attention dropout give the same output under it."""
    import dataclasses

    from aurora_jax.models.bert import BertMED

    vit = ViTConfig(image_size=16, patch_size=8, hidden_size=D, num_layers=3, num_heads=HEADS, mlp_dim=4 * D,
                    drop_path=0.5)
    pixels = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)
    bert = BertConfig(vocab_size=20, hidden_size=D, num_layers=2, num_heads=HEADS, intermediate_size=4 * D,
                      max_position_embeddings=16, encoder_width=D, dropout=0.1, attention_dropout=0.3)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 20, (2, 6)))
    rngs = {"dropout": jax.random.key(5)}
    for model, args in ((VisionTransformer(vit), (pixels,)), (BertMED(bert), (ids, jnp.ones_like(ids)))):
        params = model.init(jax.random.key(0), *args)["params"]
        remat = type(model)(dataclasses.replace(model.cfg, remat=True))
        plain = model.apply({"params": params}, *args, deterministic=False, rngs=rngs)
        again = remat.apply({"params": params}, *args, deterministic=False, rngs=rngs)
        np.testing.assert_allclose(np.asarray(again), np.asarray(plain), rtol=1e-6, atol=1e-6)
        assert rel_err(model.apply({"params": params}, *args), plain) > 1e-3  # the masks do act
