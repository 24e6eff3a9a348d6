"""Captioning with BLIP's causal text decoder: LM loss and greedy decoding."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
IGNORE = -100


def lm_targets(input_ids: Array, attention_mask: Array, prompt_len: int = 1) -> Array:
    """Next-token targets: ids shifted left, padding and the first `prompt_len - 1` targets ignored."""
    targets = jnp.where(attention_mask.astype(bool), input_ids, IGNORE)[:, 1:]
    if prompt_len > 1:
        targets = targets.at[:, : prompt_len - 1].set(IGNORE)
    return targets


def lm_loss_per_sequence(logits: Array, targets: Array, label_smoothing: float = 0.0) -> Array:
    """Sum over tokens of the (label-smoothed) cross-entropy; logits (B, T, V) predict targets (B, T-1)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    valid = targets != IGNORE
    safe = jnp.where(valid, targets, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    return jnp.sum(jnp.where(valid, nll, 0.0), axis=-1)


def lm_loss(logits: Array, targets: Array, label_smoothing: float = 0.0) -> Array:
    """Token-mean LM loss as torch's CrossEntropyLoss(reduction='mean', ignore_index=-100)."""
    n = jnp.maximum(jnp.sum(targets != IGNORE), 1)
    return jnp.sum(lm_loss_per_sequence(logits, targets, label_smoothing)) / n


def greedy_decode(
    logits_fn: Callable[[Array], Array],
    prompt: Array,
    *,
    max_len: int,
    eos_id: int,
    pad_id: int,
) -> Array:
    """Greedy decoding by recomputation over a fixed (B, max_len) buffer (short BLIP captions/answers).

    `logits_fn(tokens)` -> (B, max_len, V) from a causal decoder, so garbage after position t never
    influences position t. `prompt` (B, P) is the common prefix (e.g. [DEC] or [DEC] + "a picture of").
    Finished sequences are padded with pad_id after their eos.
    """
    b, p = prompt.shape
    tokens = jnp.full((b, max_len), pad_id, jnp.int32).at[:, :p].set(prompt.astype(jnp.int32))

    def step(t, carry):
        tokens, done = carry
        logits = logits_fn(tokens)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), axis=-1)
        nxt = jnp.where(done, pad_id, nxt).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, t, axis=1)
        return tokens, done | (nxt == eos_id)

    tokens, _ = jax.lax.fori_loop(p, max_len, step, (tokens, jnp.zeros((b,), bool)))
    return tokens


def caption_train_loss(
    fwd: Callable, batch: dict[str, Array], rng: Array, *, bos_token_id: int, prompt_len: int = 1,
    label_smoothing: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """Decoder LM loss on captions (first token replaced by [DEC]); prompt tokens are not predicted.

    Batch keys: image (B,H,W,3), text_ids/text_mask (B,T).
    """
    from aurora_jax.models.blip import Blip

    del rng
    ids = batch["text_ids"].at[:, 0].set(bos_token_id)
    mask = batch["text_mask"]
    logits = fwd(Blip.decode, ids, mask, fwd(Blip.encode_image, batch["image"]))
    loss = lm_loss(logits, lm_targets(ids, mask, prompt_len), label_smoothing)
    return loss, {"loss": loss}
