"""Batched generation: greedy vs transformers' generate (left padding, stop tokens), sampling filters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aurora_jax.convert.llama import llama_keymap
from aurora_jax.generate import SamplingConfig, generate, sample_logits, sampling_preset, top_k_filter, top_p_filter
from aurora_jax.models.llama import LlamaConfig, LlamaDecoder, abstract_params
from tests.fixtures import convert_sd, make_hf_llama

PAD = 0


@pytest.fixture(scope="module")
def lm(hf_llama):
    cfg = LlamaConfig.from_hf(hf_llama.config.to_dict())
    params = convert_sd(llama_keymap(cfg), hf_llama.state_dict(), abstract_params(cfg))
    return hf_llama, cfg, params


def _prompts(lengths, vocab, seed=0):
    rng = np.random.RandomState(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), PAD, np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = rng.randint(3, vocab, n)
        mask[i, t - n :] = 1
    return ids, mask


def _hf_generate(hf, ids, mask, n, eos):
    hf.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=0,
            pad_token_id=PAD,
        )
    return out[:, ids.shape[1] :].numpy()


def _ours(cfg, params, ids, mask, sampling, rng=None):
    inputs = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask, jnp.int32)}
    out = generate(LlamaDecoder(cfg), params, inputs, rng, sampling)
    return np.asarray(out.tokens), np.asarray(out.lengths)


@pytest.mark.parametrize("lengths", [[11], [11, 4, 8]], ids=["single", "batch3_left_padded"])
def test_greedy_matches_transformers(lm, lengths):
    hf, cfg, params = lm
    ids, mask = _prompts(lengths, cfg.vocab_size)
    want = _hf_generate(hf, ids, mask, 32, eos=None)
    got, n = _ours(cfg, params, ids, mask, SamplingConfig(max_new_tokens=32, pad_id=PAD))
    assert want.shape == (len(lengths), 32)
    np.testing.assert_array_equal(got, want)
    assert (n == 32).all()


def test_greedy_gqa_left_padded_matches_transformers():
    hf = make_hf_llama(7, num_key_value_heads=2, rope_theta=500000.0)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    params = convert_sd(llama_keymap(cfg), hf.state_dict(), abstract_params(cfg))
    ids, mask = _prompts([3, 10], cfg.vocab_size, seed=5)
    want = _hf_generate(hf, ids, mask, 32, eos=None)
    got, _ = _ours(cfg, params, ids, mask, SamplingConfig(max_new_tokens=32, pad_id=PAD))
    np.testing.assert_array_equal(got, want)


def test_greedy_stop_tokens_match_transformers(lm):
    hf, cfg, params = lm
    ids, mask = _prompts([9, 6], cfg.vocab_size, seed=1)
    free, _ = _ours(cfg, params, ids, mask, SamplingConfig(max_new_tokens=32, pad_id=PAD))
    # Stop on tokens that each row produces early on (two stop ids, as LLaMA-3 style configs have).
    stops = (int(free[0, 4]), int(free[1, 9]))
    want = _hf_generate(hf, ids, mask, 32, eos=list(stops))
    got, n = _ours(cfg, params, ids, mask, SamplingConfig(max_new_tokens=32, stop_tokens=stops, pad_id=PAD))
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == PAD).all()
    for row, length in zip(got, n, strict=True):
        assert row[length - 1] in stops and not np.isin(row[: length - 1], stops).any()
        assert (row[length:] == PAD).all()


def test_generate_compiles_once(lm):
    _, cfg, params = lm
    ids, mask = _prompts([5, 3], cfg.vocab_size)
    s = SamplingConfig(max_new_tokens=4, pad_id=PAD)
    before = generate._cache_size()
    _ours(cfg, params, ids, mask, s)
    _ours(cfg, params, ids + 1, mask, s)
    assert generate._cache_size() == before + 1


def test_sampling(lm):
    _, cfg, params = lm
    ids, mask = _prompts([6, 4], cfg.vocab_size)
    greedy, _ = _ours(cfg, params, ids, mask, SamplingConfig(max_new_tokens=8))
    hot = SamplingConfig(max_new_tokens=8, temperature=1.5)
    a, _ = _ours(cfg, params, ids, mask, hot, jax.random.key(1))
    b, _ = _ours(cfg, params, ids, mask, hot, jax.random.key(1))
    c, _ = _ours(cfg, params, ids, mask, hot, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # A vanishing nucleus keeps only the top token: sampling becomes greedy.
    tiny_p, _ = _ours(
        cfg,
        params,
        ids,
        mask,
        SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6),
        jax.random.key(3),
    )
    np.testing.assert_array_equal(tiny_p, greedy)


def test_top_k_filter():
    logits = jnp.asarray([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, 1.0]])
    kept = np.isfinite(np.asarray(top_k_filter(logits, 2)))
    np.testing.assert_array_equal(kept, [[False, True, False, True], [True, False, False, True]])


def test_top_p_filter_keeps_smallest_nucleus():
    probs = np.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]])
    logits = jnp.log(jnp.asarray(probs))
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.8)))
    # Row 0: 0.5 + 0.3 reaches 0.8; row 1: ties, 0.25 * 4 needed to pass 0.8 -> all four.
    np.testing.assert_array_equal(kept, [[True, False, True, False], [True, True, True, True]])
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.81)))
    np.testing.assert_array_equal(kept[0], [True, False, True, True])
    # Sampling only ever returns kept tokens.
    draws = jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(temperature=1.0, top_p=0.8)))(
        jax.random.split(jax.random.key(0), 200)
    )
    assert set(np.unique(np.asarray(draws)[:, 0])) <= {0, 2}


def test_sampling_config_validation():
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="rng"):
        generate(
            LlamaDecoder(
                LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
            ),
            {},
            {"attention_mask": jnp.ones((1, 2))},
            None,
            SamplingConfig(temperature=1.0),
        )


def test_owl_v1_preset_is_the_releases_generation_config():
    """mPLUG-Owl's GenerationConfig: do_sample with top_k=3 (temperature, top_p 1), max_length 512 in all."""
    cfg = sampling_preset("owl_v1", max_new_tokens=64, stop_tokens=(2,))
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.stop_tokens) == (1.0, 1.0, 3, 64, (2,))
    assert sampling_preset("owl_v1", max_new_tokens=64, prompt_length=500).max_new_tokens == 12
    with pytest.raises(ValueError, match="allows 512"):
        sampling_preset("owl_v1", prompt_length=512)
    with pytest.raises(ValueError, match="unknown sampling preset"):
        sampling_preset("beam")
    assert sampling_preset("greedy").temperature == 0.0
    # Sampling draws only the 3 best tokens, in proportion to their softmax among themselves.
    logits = jnp.asarray(np.log([0.05, 0.4, 0.1, 0.3, 0.15]), jnp.float32)[None].repeat(4000, 0)
    draws = np.asarray(sample_logits(logits, jax.random.key(0), cfg))
    assert set(np.unique(draws)) == {1, 3, 4}
    freq = np.bincount(draws, minlength=5)[[1, 3, 4]] / len(draws)
    np.testing.assert_allclose(freq, np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)
