"""Scanned layers (models.stack): the same numbers as the unrolled stack, with and without adapters."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.generate import SamplingConfig, generate
from aurora_jax.models import stack
from aurora_jax.models.blip import Blip, BlipConfig, abstract_params
from aurora_jax.models.llama import Llama, LlamaConfig, LlamaDecoder, init_cache
from aurora_jax.models.llama import abstract_params as llama_abstract
from aurora_jax.models.llama import init_params as llama_init
from aurora_jax.parallel.mesh import DEFAULT_RULES
from aurora_jax.peft import PeftConfig, init_adapter, tuned_apply
from aurora_jax.peft.sites import dense_kernels
from tests.fixtures import RANK, TINY_RETRIEVAL, blip_inputs, fast_init, rel_err, trained_adapter

TOL = 1e-5
DEPTH = 3  # three layers: a wrong layer index cannot hide behind a symmetric pair


def _deep(cfg: BlipConfig) -> BlipConfig:
    return cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=DEPTH),
                       text=dataclasses.replace(cfg.text, num_layers=DEPTH))


@pytest.fixture(scope="module")
def blip():
    cfg = _deep(TINY_RETRIEVAL)
    params = fast_init(cfg, 0)
    scanned = stack.with_scan(cfg, True)
    return cfg, params, scanned, stack.match_layout(params, abstract_params(scanned))


def test_layouts_round_trip_and_carry_the_layers_axis(blip):
    cfg, params, scanned, stacked = blip
    assert "layers" in stacked["visual_encoder"] and "layer_0" not in stacked["visual_encoder"]
    assert stacked["visual_encoder"]["layers"]["attn"]["qkv"]["kernel"].shape == (DEPTH, 32, 96)
    assert stacked["text_encoder"]["layers"]["cross_attn"]["query"]["kernel"].shape == (DEPTH, 32, 32)
    back = stack.match_layout(stacked, abstract_params(cfg))
    jax.tree.map(np.testing.assert_array_equal, back, params)
    boxed = abstract_params(scanned, boxed=True)
    assert boxed["visual_encoder"]["layers"]["mlp"]["fc1"]["kernel"].names == ("layers", "embed", "mlp")
    assert dict(DEFAULT_RULES)["layers"] is None  # the stacked axis is never sharded
    # Adapters are addressed per layer in both layouts.
    assert dense_kernels(stacked) == dense_kernels(params)


@pytest.mark.parametrize("peft", [
    dict(method="aurora", rank=RANK),  # mode approximation on every ViT and BERT site, and GQT
    dict(method="aurora", rank=RANK, sites="layer_1/", gqt=False),  # one layer adapted, the others not
    dict(method="lora", lora_r=2, lora_targets=("query", "value", "qkv")),
], ids=["aurora_gqt", "aurora_one_layer", "lora"])
def test_tuned_blip_outputs_and_adapter_gradients_match(blip, peft):
    cfg, params, scanned, stacked = blip
    peft_cfg = PeftConfig(**peft)
    adapter = trained_adapter(init_adapter(params, peft_cfg, jax.random.key(1)), v_std=0.3, gqt_std=0.3)
    assert jax.tree.structure(init_adapter(stacked, peft_cfg, jax.random.key(1))) == jax.tree.structure(adapter)
    pixels, ids, mask = blip_inputs()

    def loss(adapter, model_cfg, base):
        sim, itm = tuned_apply(Blip(model_cfg), base, adapter, peft_cfg, pixels, ids, mask)
        return jnp.sum(sim**2) + jnp.sum(jnp.tanh(itm)), (sim, itm)

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    g0, (sim0, itm0) = grad(adapter, cfg, params)
    g1, (sim1, itm1) = grad(adapter, scanned, stacked)
    assert rel_err(sim1, sim0) < TOL and rel_err(itm1, itm0) < TOL
    for path, a in jax.tree_util.tree_leaves_with_path(g0):
        b = dict(jax.tree_util.tree_leaves_with_path(g1))[path]
        assert rel_err(b, a) < TOL or float(jnp.max(jnp.abs(a))) == 0.0, jax.tree_util.keystr(path)


def test_scanned_blip_trains_with_dropout_and_drop_path(blip):
    """Training mode (BERT dropout, ViT drop path, adapter dropout) runs scanned, with remat, and is random."""
    _, _, scanned, stacked = blip
    train_cfg = scanned.replace(vision=dataclasses.replace(scanned.vision, drop_path=0.3, remat=True),
                                text=dataclasses.replace(scanned.text, dropout=0.1, remat=True))
    peft_cfg = PeftConfig(method="aurora", rank=RANK, dropout=0.1)
    adapter = trained_adapter(init_adapter(stacked, peft_cfg, jax.random.key(1)))
    pixels, ids, mask = blip_inputs()

    def run(key):
        return tuned_apply(Blip(train_cfg), stacked, adapter, peft_cfg, pixels, ids, mask, rng=key,
                           deterministic=False)[1]

    a, b = run(jax.random.key(0)), run(jax.random.key(1))
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)
    np.testing.assert_array_equal(run(jax.random.key(0)), a)


@pytest.fixture(scope="module")
def owl2_llm():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=DEPTH, num_heads=4,
                      num_kv_heads=2, modality_adaptive=True, max_position_embeddings=1024)
    params = llama_init(cfg, jax.random.key(0))
    scanned = cfg.replace(scan=True)
    return cfg, params, scanned, stack.match_layout(params, llama_abstract(scanned))


def test_llama_long_prompt_and_remat_gradients_match(owl2_llm):
    cfg, params, scanned, stacked = owl2_llm
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 520)))
    modality = (jnp.arange(520)[None] % 3 == 0).astype(jnp.int32)
    fwd = jax.jit(lambda p, c: Llama(c).apply({"params": p}, ids, modality=modality), static_argnums=1)
    assert rel_err(fwd(stacked, scanned), fwd(params, cfg)) < TOL

    def loss(p, c):
        return jnp.mean(Llama(c).apply({"params": p}, ids[:, :16], modality=modality[:, :16]) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g0 = grad(params, cfg)
    g1 = stack.unstack_layers(grad(stacked, scanned.replace(remat=True)))
    for path, a in jax.tree_util.tree_leaves_with_path(g0):
        assert rel_err(dict(jax.tree_util.tree_leaves_with_path(g1))[path], a) < TOL, jax.tree_util.keystr(path)


def test_llama_greedy_generation_is_identical_with_a_scanned_cache(owl2_llm):
    cfg, params, scanned, stacked = owl2_llm
    assert init_cache(scanned, 2, 8)["layers"]["k"].shape == (DEPTH, 2, 8, 2, 8)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(3, 64, (2, 9)))
    mask = jnp.asarray([[1] * 9, [0] * 4 + [1] * 5])
    sampling = SamplingConfig(max_new_tokens=12)
    a = generate(LlamaDecoder(cfg), params, {"input_ids": ids, "attention_mask": mask}, cfg=sampling)
    b = generate(LlamaDecoder(scanned), stacked, {"input_ids": ids, "attention_mask": mask}, cfg=sampling)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
