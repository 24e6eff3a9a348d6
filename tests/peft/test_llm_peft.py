"""LoRA and Aurora on the LLM of mPLUG-Owl / Owl2: sites, zero-init, KV-cached generation, gradients, merge."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.models.owl import Owl, OwlDecoder, abstract_params
from aurora_jax.peft import (
    LLM_LINEARS,
    PeftConfig,
    TunedDecoder,
    count_params,
    init_adapter,
    lora_sites,
    merge,
    tuned_apply,
)
from aurora_jax.peft.partition import combine, partition
from aurora_jax.peft.sites import aurora_sites
from aurora_jax.train.recipes.owl import V1_LORA_TARGETS
from tests.fixtures import params_for, prompts, randomize, tiny_owl

RANK = 4
CONFIGS = {
    "lora_qv": PeftConfig(method="lora", lora_r=4, lora_alpha=8.0, lora_targets=V1_LORA_TARGETS),
    "lora_all": PeftConfig(method="lora", lora_r=4, lora_alpha=8.0, lora_targets=LLM_LINEARS),
    "aurora_attn": PeftConfig(method="aurora", rank=RANK, sites=r"^llm/.*/attn/", gqt=False),
    "aurora_all": PeftConfig(method="aurora", rank=RANK, sites=r"^llm/", gqt=False, core="diagonal"),
}


@pytest.fixture(scope="module")
def owl2():
    cfg = tiny_owl(2)
    return cfg, params_for(cfg, 0)


def forward(cfg, peft):
    """The tuned Owl's logits, jitted (eager op-by-op dispatch is slow on a shared CPU)."""
    return jax.jit(lambda p, a, ids, px, mask: tuned_apply(Owl(cfg), p, a, peft, ids, px, mask))


def _paths(sites) -> set[str]:
    return {"/".join(p) for p in sites}


def test_lora_targets_on_owl_paths():
    """Names match both modality copies (as the release's LoRA); 'k_proj/image' picks one; nothing else."""
    owl2, owl1 = abstract_params(tiny_owl(2)), abstract_params(tiny_owl(1))
    qv = _paths(lora_sites(owl2, V1_LORA_TARGETS))
    assert qv == {f"llm/layer_{i}/attn/{n}" for i in range(2) for n in ("q_proj", "v_proj/text", "v_proj/image")}
    assert _paths(lora_sites(owl2, "q_proj|v_proj")) == qv  # a regex on the name behaves the same
    every = _paths(lora_sites(owl2, LLM_LINEARS))
    assert len(every) == 2 * 9 and all(p.startswith("llm/") for p in every)  # q, o, 2 k, 2 v, gate, up, down
    assert _paths(lora_sites(owl2, ("k_proj/image",))) == {f"llm/layer_{i}/attn/k_proj/image" for i in range(2)}
    assert _paths(lora_sites(owl1, V1_LORA_TARGETS)) == {
        f"llm/layer_{i}/attn/{n}" for i in range(2) for n in ("q_proj", "v_proj")}


def test_aurora_llm_sites_and_counts():
    """One R x 1 factor per site; U per input width, V per output width (GQA k/v: 32 -> 16; MLP 32 <-> 48)."""
    base = abstract_params(tiny_owl(2))
    attn = jax.eval_shape(lambda k: init_adapter(base, CONFIGS["aurora_attn"], k), jax.random.key(0))
    assert set(attn["shared"]) == {"C", "U_32", "V_32", "V_16"}
    assert set(attn["factors"]) == {"llm"}
    assert len(aurora_sites(base, r"^llm/.*/attn/")) == 2 * 6  # q, o, k text/image, v text/image
    r = RANK
    assert count_params(attn) == r**3 + 32 * r + r * (32 + 16) + 2 * 6 * r
    full = jax.eval_shape(lambda k: init_adapter(base, CONFIGS["aurora_all"], k), jax.random.key(0))
    assert set(full["shared"]) == {"C", "U_32", "U_48", "V_32", "V_16", "V_48"}
    assert count_params(full) == r + (32 + 48) * r + r * (32 + 16 + 48) + 2 * 9 * r  # diagonal core: R weights


def test_aurora_on_owl_refuses_unselected_vit():
    """Owl's ViT has a per-head fused qkv that Aurora's ViT delta does not support: select the LLM."""
    base = abstract_params(tiny_owl(2))
    assert all(p[0] == "llm" for p in aurora_sites(base, r"^llm/"))
    assert any(p[0] == "vision" for p in aurora_sites(base, ""))


@pytest.mark.parametrize("name", ["lora_qv", "aurora_attn"])
def test_fresh_adapter_is_the_base(owl2, name):
    """V = 0 (Aurora) / B = 0 (LoRA): the tuned model starts exactly at the backbone."""
    cfg, params = owl2
    peft = CONFIGS[name]
    adapter = init_adapter(params, peft, jax.random.key(1))
    x = prompts(2)
    args = x["input_ids"], x["pixels"], x["attention_mask"]
    f = forward(cfg, peft)
    base = f(params, {}, *args)
    np.testing.assert_array_equal(np.asarray(f(params, adapter, *args)), np.asarray(base))
    moved = f(params, randomize(adapter), *args)
    assert np.abs(np.asarray(moved) - np.asarray(base)).max() > 1e-2


def test_kv_cached_decoding_applies_the_adapter(owl2):
    """Prefill + cached one-token steps through `TunedDecoder` (what `generate` runs) == full recomputation
    with the adapter. LoRA on every linear and Aurora on every LLM linear at once (GQA k/v, MLP sites):
    the randomised adapter changes k/v, so a cached path without it (the release's BLIP decoder) fails."""
    cfg, params = owl2
    lora, aurora = CONFIGS["lora_all"], CONFIGS["aurora_all"]
    peft = aurora.replace(lora_r=lora.lora_r, lora_alpha=lora.lora_alpha)
    adapter = {**init_adapter(params, aurora, jax.random.key(2)), **init_adapter(params, lora, jax.random.key(3))}
    adapter = randomize(adapter, seed=3)
    x = prompts(2, seed=4)
    t, n = x["input_ids"].shape[1], 5
    dec = TunedDecoder(OwlDecoder(cfg), peft)
    logits, cache, pos = jax.jit(dec.prefill)((params, adapter), dec.init_cache(2, t + n), x)
    step = jax.jit(dec.step)
    cached, tokens = [np.asarray(logits)], []
    for i in range(n):
        tokens.append(np.asarray(cached[-1]).argmax(-1).astype(np.int32))  # greedy, as generate does
        if i < n - 1:
            logits, cache = step((params, adapter), jnp.asarray(tokens[-1]), pos + i, cache)
            cached.append(np.asarray(logits))
    tokens = np.stack(tokens, 1)
    ids = np.concatenate([x["input_ids"], tokens], axis=1)
    mask = np.concatenate([x["attention_mask"], np.ones_like(tokens)], axis=1)
    full = np.asarray(forward(cfg, peft)(params, adapter, ids, x["pixels"], mask))[:, t - 1 : t - 1 + n]
    np.testing.assert_allclose(np.stack(cached, 1), full, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(full.argmax(-1), tokens)


@pytest.mark.parametrize("name", ["lora_qv", "aurora_attn"])
def test_only_the_adapter_gets_gradients(owl2, name):
    cfg, params = owl2
    peft = CONFIGS[name]
    adapter = randomize(init_adapter(params, peft, jax.random.key(5)), seed=6)
    trainable, frozen = partition(params, adapter, peft)
    assert trainable["base"] == {}
    x = prompts(2, seed=7)

    def loss(trainable, frozen):
        base, adapter = combine(trainable, frozen)
        logits = tuned_apply(Owl(cfg), base, adapter, peft, x["input_ids"], x["pixels"], x["attention_mask"])
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    g_train, g_frozen = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, frozen)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(g_frozen))
    assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree_util.tree_leaves(g_train["adapter"]))


@pytest.mark.parametrize("name", ["lora_all", "aurora_all"])
def test_merge_equals_unmerged(owl2, name):
    """Folding the deltas into the kernels (GQA and MLP sites included) gives the adapter's outputs."""
    cfg, params = owl2
    peft = CONFIGS[name]
    adapter = randomize(init_adapter(params, peft, jax.random.key(8)), seed=9)
    x = prompts(2, seed=10)
    merged, rest = merge(params, adapter, peft)
    assert rest == {}
    args = x["input_ids"], x["pixels"], x["attention_mask"]
    want = forward(cfg, peft)(params, adapter, *args)
    got = forward(cfg, peft)(merged, {}, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_remat_keeps_the_adapter_and_its_gradients(owl2):
    """The interceptor also reaches Dense layers inside nn.remat'ed LLaMA blocks, with the same gradients."""
    cfg, params = owl2
    peft = CONFIGS["aurora_attn"]
    adapter = randomize(init_adapter(params, peft, jax.random.key(11)), seed=12)
    x = prompts(2, seed=13)

    def grads(c):
        def loss(a):
            logits = tuned_apply(Owl(c), params, a, peft, x["input_ids"], x["pixels"], x["attention_mask"])
            return jnp.mean(logits**2)

        return jax.jit(jax.grad(loss))(adapter)

    plain, remat = grads(cfg), grads(tiny_owl(2, remat=True))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_counts_on_7b_widths():
    """Per-layer adapter sizes at mPLUG-Owl2's real widths (LLaMA-2-7B: d 4096, MLP 11008), 2 LLM layers
    (the 32-layer numbers scale linearly; abstract shapes, nothing allocated)."""
    from aurora_jax.models.owl import owl2_config

    cfg = owl2_config(num_layers=2)
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=1),
                      abstractor=cfg.abstractor.replace(num_layers=1))
    base = abstract_params(cfg)

    def count(peft):
        return count_params(jax.eval_shape(lambda k: init_adapter(base, peft, k), jax.random.key(0)))

    d, f = 4096, 11008
    # v1 release LoRA (q, v; r=8): 4,194,304 on 32 layers, as HF peft reports for LLaMA-7B
    assert count(PeftConfig(method="lora", lora_r=8, lora_targets=V1_LORA_TARGETS)) == 2 * (8 * 2 * d) * 3
    # v2 release LoRA (r=128, every linear, both modality copies of k/v): 386,924,544 on 32 layers
    per_layer = 6 * 128 * 2 * d + 3 * 128 * (d + f)
    assert count(PeftConfig(method="lora", lora_r=128, lora_targets=LLM_LINEARS)) == 2 * per_layer
    # Aurora R=32 on q/k/v/o (both copies): shared U, V, C once + 6 sites x R per layer (301,056 on 32 layers)
    assert count(PeftConfig(method="aurora", rank=32, sites=r"^llm/.*/attn/")) == 2 * d * 32 + 32**3 + 2 * 6 * 32
