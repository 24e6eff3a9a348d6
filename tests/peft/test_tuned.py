"""tuned_apply: identity at V = 0, GQT only in multimodal mode, dropout, remat, config plumbing, ICE."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.models.blip import Blip
from aurora_jax.models.vit import VisionTransformer, ViTConfig
from aurora_jax.peft import (
    PeftConfig,
    informative_context,
    init_adapter,
    lora_sites,
    tuned_apply,
    tuned_forward,
)
from tests.fixtures import RANK, TINY_RETRIEVAL, TINY_VQA, blip_inputs, max_rel_err, zero_gqt

MODEL = Blip(TINY_RETRIEVAL)


def _stages(model, params, adapter, cfg, **kw):
    """itm, itc and (VQA) answer logits of a (tuned) model."""
    pixels, ids, mask = blip_inputs()
    run = lambda *a, method: tuned_apply(model, params, adapter, cfg, *a, method=method, **kw)  # noqa: E731
    if model.cfg.task == "vqa":
        return [run(pixels, ids, mask, ids, mask, method=Blip.vqa_logits)]
    return [run(pixels, ids, mask, method=Blip.itm), run(pixels, ids, mask, method=Blip.itc)]


@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_zero_V_is_the_base_model(task, retrieval_params, vqa_params):
    params, cfg_model = (retrieval_params, TINY_RETRIEVAL) if task == "retrieval" else (vqa_params, TINY_VQA)
    model = Blip(cfg_model)
    cfg = PeftConfig(rank=RANK)
    adapter = zero_gqt(init_adapter(params, cfg, jax.random.key(0)))  # V = 0 from init; GQT zeroed
    assert not np.any(np.asarray(adapter["shared"]["V"]))

    # eager, op by op: under jit the two programs may fuse differently and round differently
    base = _stages(model, params, {}, cfg)
    for got, want in zip(_stages(model, params, adapter, cfg), base, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # dropout sits between U and V, so it cannot move a V = 0 model either
    dropped = _stages(model, params, adapter, cfg, rng=jax.random.key(1), deterministic=False)
    np.testing.assert_array_equal(np.asarray(dropped[0]), np.asarray(base[0]))


def test_gqt_only_in_multimodal_mode(retrieval_params, retrieval_adapter, aurora_cfg):
    _, ids, mask = blip_inputs()
    image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 32)), jnp.float32)
    no_gqt = {k: v for k, v in retrieval_adapter.items() if k != "gqt"}
    run = lambda a, *args, method: tuned_apply(MODEL, retrieval_params, a, aurora_cfg, *args,  # noqa: E731
                                               method=method)
    np.testing.assert_array_equal(run(retrieval_adapter, ids, mask, method=Blip.encode_text),
                                  run(no_gqt, ids, mask, method=Blip.encode_text))
    assert max_rel_err(run(retrieval_adapter, ids, mask, image, method=Blip.encode_multimodal),
                   run(no_gqt, ids, mask, image, method=Blip.encode_multimodal)) > 1e-2
    # cfg.gqt=False switches it off even when the adapter holds GQT vectors
    off = aurora_cfg.replace(gqt=False)
    np.testing.assert_array_equal(
        tuned_apply(MODEL, retrieval_params, retrieval_adapter, off, ids, mask, image,
                    method=Blip.encode_multimodal),
        run(no_gqt, ids, mask, image, method=Blip.encode_multimodal))


def test_dropout(retrieval_params, retrieval_adapter, aurora_cfg):
    pixels, ids, mask = blip_inputs()
    cfg = aurora_cfg.replace(dropout=0.5)

    def itm(**kw):
        return np.asarray(tuned_apply(MODEL, retrieval_params, retrieval_adapter, cfg, pixels, ids, mask,
                                      method=Blip.itm, **kw))

    clean = itm()
    np.testing.assert_array_equal(itm(rng=jax.random.key(0)), clean)  # deterministic=True ignores the rng
    a = itm(rng=jax.random.key(0), deterministic=False)
    np.testing.assert_array_equal(itm(rng=jax.random.key(0), deterministic=False), a)  # same rng, same output
    assert max_rel_err(a, clean) > 1e-3
    assert max_rel_err(itm(rng=jax.random.key(1), deterministic=False), a) > 1e-3
    with pytest.raises(ValueError, match="rng"):
        itm(deterministic=False)
    # tuned_forward: one key per call, reproducible
    fwd = lambda: tuned_forward(MODEL, retrieval_params, retrieval_adapter, cfg,  # noqa: E731
                                rng=jax.random.key(0), deterministic=False)
    f1, f2 = fwd(), fwd()
    x1, y1 = f1(Blip.itm, pixels, ids, mask), f1(Blip.itm, pixels, ids, mask)
    np.testing.assert_array_equal(x1, f2(Blip.itm, pixels, ids, mask))
    assert max_rel_err(x1, y1) > 1e-3


def test_remat_and_jit_grad_agree(retrieval_params, retrieval_adapter, aurora_cfg):
    """Interception inside nn.remat (lifted jax.checkpoint) gives the same values and adapter gradients."""
    pixels, ids, mask = blip_inputs()
    remat_cfg = TINY_RETRIEVAL.replace(vision=dataclasses.replace(TINY_RETRIEVAL.vision, remat=True),
                                       text=dataclasses.replace(TINY_RETRIEVAL.text, remat=True))

    def loss(adapter, model):
        return jnp.sum(tuned_apply(model, retrieval_params, adapter, aurora_cfg, pixels, ids, mask,
                                   method=Blip.itm) ** 2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l1, g1), (l2, g2) = grad(retrieval_adapter, MODEL), grad(retrieval_adapter, Blip(remat_cfg))
    assert abs(float(l1 - l2)) <= 1e-6 * abs(float(l1))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_per_head_qkv_is_refused():
    """mPLUG-Owl's per-head qkv layout would scramble the [q | k | v] delta: refuse it loudly."""
    vit = VisionTransformer(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                      mlp_dim=64, qkv_layout="per_head"))
    params = nn.meta.unbox(jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
    cfg = PeftConfig(rank=2, gqt=False)
    adapter = jax.eval_shape(lambda k: init_adapter(params, cfg, k), jax.random.key(0))
    with pytest.raises(NotImplementedError, match="qkv_layout"):
        jax.eval_shape(lambda p, a: tuned_apply(vit, p, a, cfg, jnp.zeros((1, 16, 16, 3))), params, adapter)


def test_site_selection(retrieval_params):
    cfg = PeftConfig(rank=RANK, sites=r"visual_encoder/.*/attn", gqt=False)
    adapter = init_adapter(retrieval_params, cfg, jax.random.key(0))
    assert list(adapter["factors"]) == ["visual_encoder"]
    assert {k for layer in adapter["factors"]["visual_encoder"].values() for k in layer} == {"attn"}
    text_only = init_adapter(retrieval_params, PeftConfig(rank=RANK, sites="text_encoder"), jax.random.key(0))
    assert list(text_only["factors"]) == ["text_encoder"]
    with pytest.raises(ValueError, match="no Dense"):
        init_adapter(retrieval_params, PeftConfig(sites="nothing_matches"), jax.random.key(0))


def test_lora_targets_like_hf_peft(retrieval_params):
    names = lambda t: sorted({p[-1] for p in lora_sites(retrieval_params, t)})  # noqa: E731
    assert names("query|value|qkv") == ["qkv", "query", "value"]  # regex on the name...
    assert len(lora_sites(retrieval_params, r"text_encoder/layer_0/.*/query")) == 2  # ...or the whole path
    assert names(("query", "attn/proj")) == ["proj", "query"]  # a list matches path suffixes
    assert lora_sites(retrieval_params, ("uery",)) == {}


def test_config_from_train_config():
    from aurora_jax.train.config import base_config

    cfg = PeftConfig.from_dict(base_config().peft)
    assert cfg.method == "aurora" and cfg.rank == 32 and cfg.train_heads == ("vision_proj", "itm_head")
    assert PeftConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        PeftConfig.from_dict({"rnak": 4})
    with pytest.raises(ValueError, match="method"):
        PeftConfig(method="adapter")


def test_informative_context():
    rng = np.random.default_rng(0)
    pos, text = rng.normal(size=(3, 8)), rng.normal(size=(5, 8))
    got = informative_context(jnp.asarray(pos), jnp.asarray(text))
    np.testing.assert_allclose(got, pos + 0.1 * text.mean(0), rtol=1e-6)
    g = jax.grad(lambda t: informative_context(jnp.zeros((3, 8)), t).sum())(jnp.asarray(text))
    np.testing.assert_allclose(g, np.full((5, 8), 3 * 0.1 / 5), rtol=1e-6)
