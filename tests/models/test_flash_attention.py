"""attention_impl="flash" (the Pallas TPU kernel) against the mask path, on CPU in Pallas's TPU interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from aurora_jax.models import layers
from aurora_jax.models.llama import Llama, LlamaConfig, init_params


def padded_mask(b: int, t: int, lengths) -> np.ndarray:
    mask = np.zeros((b, t), np.int32)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return mask


def test_flash_matches_masked_attention_values_and_gradients():
    """Causal + right padding + grouped-query heads: equal outputs and q/k/v gradients at the real tokens."""
    b, t, n, kv, h = 1, 128, 2, 1, 16  # interpret mode simulates every kernel step: the fewest that show it all
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
    key_mask = jnp.asarray(padded_mask(b, t, (90,)))
    mask = layers.combine_masks(layers.padding_mask(key_mask), layers.causal_mask(t, t))
    real = np.asarray(key_mask, bool)
    weights = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) * key_mask[:, :, None, None]

    def xla(q, k, v):
        return layers.dot_product_attention(q, k, v, mask, scale=h**-0.5)

    def flash(q, k, v):
        return layers.flash_attention(q, k, v, key_mask, scale=h**-0.5)

    with pltpu.force_tpu_interpret_mode():
        out = flash(q, k, v)
        grads = jax.grad(lambda *a: jnp.sum(flash(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    want = xla(q, k, v)
    want_grads = jax.grad(lambda *a: jnp.sum(xla(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], atol=2e-5, rtol=1e-5)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_llama_flash_call_site_passes_the_key_padding(monkeypatch):
    """Fast stand-in for the kernel: what llama.py hands `flash_attention` (q, k, v, key padding, scale) gives the
    default path's logits at the real tokens when attended with a causal + padding mask."""
    seen = []

    def reference(q, k, v, key_mask, *, scale):
        seen.append(np.asarray(key_mask))
        t = q.shape[1]
        mask = layers.combine_masks(layers.padding_mask(key_mask), layers.causal_mask(t, t))
        return layers.dot_product_attention(q, k, v, mask, scale=scale)

    monkeypatch.setattr(layers, "flash_attention", reference)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 16)), jnp.int32)
    mask = jnp.asarray(padded_mask(2, 16, (16, 9)))
    want = Llama(cfg).apply({"params": params}, ids, attention_mask=mask)
    got = Llama(cfg.replace(attention_impl="flash")).apply({"params": params}, ids, attention_mask=mask)
    assert len(seen) == 2 and all(np.array_equal(m, np.asarray(mask)) for m in seen)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-6, rtol=1e-6)


def test_llama_with_flash_attention_matches_the_default_path():
    """The model's call site: key padding taken from the causal mask, logits equal at the real tokens."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, 128)), jnp.int32)
    mask = jnp.asarray(padded_mask(1, 128, (70,)))
    want = Llama(cfg).apply({"params": params}, ids, attention_mask=mask)
    flash = Llama(cfg.replace(attention_impl="flash"))
    with pltpu.force_tpu_interpret_mode():
        got = flash.apply({"params": params}, ids, attention_mask=mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, rtol=1e-5)


def test_flash_is_refused_off_tpu():
    q = jnp.zeros((1, 128, 2, 16))
    with pytest.raises(ValueError, match="runs on TPUs only .* use attention_impl='xla'"):
        layers.flash_attention(q, q, q, None, scale=0.25)
    with layers.compiling_for_tpu(), pytest.raises(ValueError, match="multiple of 128, got 100"):
        layers.flash_attention(q[:, :100], q[:, :100], q[:, :100], None, scale=0.25)
