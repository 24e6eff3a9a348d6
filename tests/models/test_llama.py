"""LLaMA vs transformers' LlamaForCausalLM; KV cache vs recomputation; modality-adaptive LLaMA vs torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aurora_jax.convert.llama import convert_llama, llama_keymap
from aurora_jax.models.llama import Llama, LlamaConfig, abstract_params, init_cache, positions_from_mask
from tests.fixtures import TINY_OWL2_LLM, convert_sd, make_hf_llama, randomize_norms, rel_err, t2n
from tests.models.owl_torch_ref import RefMWLlama

TOL = 1e-5


def _from_hf(model) -> tuple[LlamaConfig, dict]:
    cfg = LlamaConfig.from_hf(model.config.to_dict())
    return cfg, convert_sd(llama_keymap(cfg), model.state_dict(), abstract_params(cfg))


def _left_padded(rng: np.random.RandomState, lengths, vocab: int, pad: int = 0):
    t = max(lengths)
    ids = np.full((len(lengths), t), pad, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = rng.randint(3, vocab, n)
        mask[i, t - n :] = 1
    return ids, mask


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # GQA with a non-default RoPE theta and tied embeddings.
        dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True),
    ],
    ids=["mha", "gqa_tied_theta"],
)
def test_logits_long_prompt_vs_transformers(tmp_path, overrides):
    """512+ token prompt from a save_pretrained checkpoint: RoPE errors only show at long range."""
    hf = make_hf_llama(1, **overrides)
    hf.save_pretrained(tmp_path)
    cfg, params = convert_llama(tmp_path)
    assert cfg.num_kv_heads == overrides.get("num_key_value_heads", 4)
    assert cfg.tie_embeddings == overrides.get("tie_word_embeddings", False)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 520))
    ours = jax.jit(lambda p, x: Llama(cfg).apply({"params": p}, x))(params, jnp.asarray(ids))
    with torch.no_grad():
        ref = t2n(hf(torch.tensor(ids)).logits)
    err = rel_err(ours, ref)
    print(f"long-prompt logits rel err ({'/'.join(overrides) or 'mha'}): {err:.2e}")
    assert err < TOL


def test_left_padded_batch_vs_transformers(hf_llama):
    cfg, params = _from_hf(hf_llama)
    ids, mask = _left_padded(np.random.RandomState(1), [12, 7, 3], cfg.vocab_size)
    ours = Llama(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        ref = t2n(
            hf_llama(
                torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
            ).logits
        )
    valid = mask.astype(bool)
    err = rel_err(np.asarray(ours)[valid], ref[valid])
    print(f"left-padded batch logits rel err: {err:.2e}")
    assert err < TOL


def test_kv_cache_decoding_equals_full_recomputation(hf_llama):
    """Prefill a left-padded prompt, then feed tokens one at a time: each step's logits match a full pass."""
    cfg, params = _from_hf(hf_llama)
    ids, mask = _left_padded(np.random.RandomState(2), [9, 5], cfg.vocab_size)
    extra = np.random.RandomState(3).randint(3, cfg.vocab_size, (2, 6))
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    model = Llama(cfg)
    full = model.apply({"params": params}, jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask))

    @jax.jit
    def run(params, cache, ids, positions, mask):
        return model.apply({"params": params}, ids, positions=positions, attention_mask=mask, cache=cache)

    cache = init_cache(cfg, 2, full_ids.shape[1] + 3)  # longer than needed: unused slots must stay masked
    pos = positions_from_mask(jnp.asarray(full_mask))
    t = ids.shape[1]
    logits, cache = run(params, cache, jnp.asarray(ids), pos[:, :t], jnp.asarray(mask))
    steps = [logits]
    for i in range(extra.shape[1]):
        logits, cache = run(
            params, cache, jnp.asarray(extra[:, i : i + 1]), pos[:, t + i : t + i + 1], jnp.ones((2, 1))
        )
        steps.append(logits)
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    valid = full_mask.astype(bool)
    err = rel_err(cached[valid], np.asarray(full)[valid])
    print(f"KV-cache vs full recomputation rel err: {err:.2e}")
    assert err < TOL
    assert int(cache["index"]) == full_ids.shape[1]


def test_remat_matches_and_differentiates(hf_llama):
    cfg, params = _from_hf(hf_llama)
    ids = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (1, 8)))

    def loss(p, c):
        return jnp.mean(Llama(c).apply({"params": p}, ids) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g0 = grad(params, cfg)
    g1 = grad(params, cfg.replace(remat=True))
    assert (
        rel_err(g1["layer_0"]["attn"]["q_proj"]["kernel"], g0["layer_0"]["attn"]["q_proj"]["kernel"]) < 1e-6
    )


def test_modality_adaptive_vs_torch_reference():
    """Owl2's multiway k/v/norms, GQA, mixed image/text tokens: logits vs an independent torch model."""
    torch.manual_seed(5)
    ref = RefMWLlama(vocab=64, d=32, heads=4, kv_heads=2, ffn=48, layers=2, eps=1e-5).eval()
    randomize_norms(ref)
    cfg = TINY_OWL2_LLM
    params = convert_sd(llama_keymap(cfg), ref.state_dict(), abstract_params(cfg))
    assert set(params["layer_0"]["attn"]["k_proj"]) == {"text", "image"}
    rng = np.random.RandomState(6)
    embeds = rng.randn(2, 24, 32).astype(np.float32)
    modality = np.zeros((2, 24), np.int64)
    modality[0, 3:13] = 1
    modality[1, 10:20] = 1
    with torch.no_grad():
        want = t2n(ref(torch.tensor(embeds), torch.tensor(modality)))
    got = Llama(cfg).apply(
        {"params": params}, inputs_embeds=jnp.asarray(embeds), modality=jnp.asarray(modality)
    )
    err = rel_err(got, want)
    print(f"modality-adaptive LLaMA rel err: {err:.2e}")
    assert err < TOL
    remat = Llama(cfg.replace(remat=True)).apply(
        {"params": params}, inputs_embeds=jnp.asarray(embeds), modality=jnp.asarray(modality)
    )
    assert rel_err(remat, got) < 1e-7
    # The indicator matters: treating every token as text changes the result.
    text_only = Llama(cfg).apply({"params": params}, inputs_embeds=jnp.asarray(embeds))
    assert rel_err(text_only, want) > 1e-3


def test_from_hf_refuses_unsupported_options():
    base = make_hf_llama(0).config.to_dict()
    with pytest.raises(ValueError, match="rope_type"):
        LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="attention_bias"):
        LlamaConfig.from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(num_heads=4, num_kv_heads=3, hidden_size=64)


# ------------------------------------------------------------------------------------------- RoPE scaling


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_rope_scaling_vs_transformers(kind):
    """rope_scaling as mPLUG-Owl2's modeling_llama2.py (transformers 4.31's classes), on a prompt longer than
    max_position_embeddings (where dynamic NTK raises the base), then KV-cached decoding across the limit
    (the base follows the keys so far; cached keys keep their rotation, as transformers' cache does)."""
    hf = make_hf_llama(2, max_position_embeddings=64, rope_scaling={"rope_type": kind, "factor": 2.0})
    cfg, params = _from_hf(hf)
    assert (cfg.rope_scaling, cfg.rope_scaling_factor) == (kind, 2.0)
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 100))
    ours = Llama(cfg).apply({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        want = t2n(hf(torch.tensor(ids)).logits)
    err = rel_err(ours, want)
    print(f"rope_scaling={kind} 100 tokens > 64 positions: rel err {err:.2e}")
    assert err < TOL
    plain = Llama(cfg.replace(rope_scaling="default", rope_scaling_factor=1.0)).apply({"params": params}, ids)
    assert rel_err(plain, want) > 1e-3  # the scaling matters on this prompt

    # Prefill 60 tokens, then 8 cached steps: positions 60..67 cross the 64 limit.
    fresh = make_hf_llama(2, max_position_embeddings=64, rope_scaling={"rope_type": kind, "factor": 2.0})
    seq = ids[:, :68]
    with torch.no_grad():
        out = fresh(torch.tensor(seq[:, :60]), use_cache=True)
        past, want_steps = out.past_key_values, []
        for t in range(60, 68):
            out = fresh(torch.tensor(seq[:, t : t + 1]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            want_steps.append(t2n(out.logits[:, -1]))
    cache = init_cache(cfg, 1, 68)
    _, cache = Llama(cfg).apply({"params": params}, jnp.asarray(seq[:, :60]), cache=cache)
    got_steps = []
    for t in range(60, 68):
        logits, cache = Llama(cfg).apply({"params": params}, jnp.asarray(seq[:, t : t + 1]), cache=cache)
        got_steps.append(np.asarray(logits[:, -1]))
    err = rel_err(np.stack(got_steps), np.stack(want_steps))
    print(f"rope_scaling={kind} cached decoding across the limit: rel err {err:.2e}")
    assert err < TOL


def test_rope_scaling_config_refusals():
    base = make_hf_llama(0).config.to_dict()
    for rope, match in [({"rope_type": "yarn", "factor": 2.0}, "rope_type='yarn'"),
                        ({"rope_type": "linear"}, "without a factor"),
                        ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16},
                         "original_max_position_embeddings")]:
        with pytest.raises(ValueError, match=match):
            LlamaConfig.from_hf({**base, "rope_parameters": {"rope_theta": 1e4, **rope}})
    # transformers 4.x spelling (the release's config.json)
    old = LlamaConfig.from_hf({**base, "rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 4.0}})
    assert (old.rope_scaling, old.rope_scaling_factor) == ("dynamic", 4.0)
    with pytest.raises(ValueError, match="factor > 1"):
        LlamaConfig(rope_scaling="linear", rope_scaling_factor=1.0)
