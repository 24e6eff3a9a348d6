"""Captioning with BLIP's causal text decoder: LM loss, greedy decoding and beam search."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aurora_jax.models.blip import Blip

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


NEG = -1.0e9  # score of an empty / excluded hypothesis (as transformers, so ties resolve alike)


def _gather_beams(x: Array, index: Array) -> Array:
    """x (B, N, ...) -> x[b, index[b, j], ...] for index (B, K)."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def beam_search(
    logits_fn: Callable[[Array], Array],
    prompt: Array,
    *,
    num_beams: int,
    max_len: int,
    eos_id: int,
    pad_id: int,
    min_len: int = 0,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
) -> tuple[Array, Array]:
    """Beam search by recomputation over fixed (B * num_beams, max_len) buffers -> (tokens (B, max_len), scores (B,)).

    `logits_fn(tokens)` -> (B * num_beams, max_len, V) from a causal decoder; row b * num_beams + k is beam k of
    item b, so encoder states are repeated with `jnp.repeat(states, num_beams, axis=0)`. Lengths count the prompt
    (B, P). Hypotheses are ranked as in transformers: sum of log-probs / (generated tokens incl. eos) **
    length_penalty; eos is barred before `min_len`; a hypothesis reaching `max_len` finishes. An item stops
    taking hypotheses once its best running beam cannot beat its worst finished one (`early_stopping=False`),
    or as soon as it holds `num_beams` finished ones (`early_stopping=True`). Padded with pad_id after eos.
    """
    b, p = prompt.shape
    k = num_beams
    keep = 2 * k  # top 2k candidates: at most k end in eos, so k can always keep running
    run = jnp.full((b, k, max_len), pad_id, jnp.int32).at[:, :, :p].set(prompt.astype(jnp.int32)[:, None])
    run_scores = jnp.full((b, k), NEG, jnp.float32).at[:, 0].set(0.0)  # one live beam: no duplicate starts
    init = dict(run=run, run_scores=run_scores, fin=run, fin_scores=jnp.full((b, k), NEG, jnp.float32),
                is_fin=jnp.zeros((b, k), bool), open=jnp.ones((b,), bool))
    top_k_mask = jnp.arange(keep) < k  # only the best k candidates may finish

    def step(t, s):
        logits = jax.lax.dynamic_index_in_dim(logits_fn(s["run"].reshape(b * k, max_len)), t - 1, 1, False)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logp = jnp.where((t < min_len) & (jnp.arange(logp.shape[-1]) == eos_id), -jnp.inf, logp)
        vocab = logp.shape[-1]
        acc = (logp.reshape(b, k, vocab) + s["run_scores"][..., None]).reshape(b, k * vocab)
        cand_scores, flat = jax.lax.top_k(acc, keep)
        beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand = jax.lax.dynamic_update_index_in_dim(_gather_beams(s["run"], beam), token, t, axis=2)
        hits = (token == eos_id) | (t + 1 >= max_len)

        # Beams that go on: the best k candidates that did not just finish.
        live_scores = cand_scores + jnp.where(hits, NEG, 0.0)
        _, nxt = jax.lax.top_k(live_scores, k)
        run, run_scores = _gather_beams(cand, nxt), _gather_beams(live_scores, nxt)

        # Finished hypotheses: merge the new ones (length-normalised) into the k best so far.
        just = hits & top_k_mask
        new = cand_scores / jnp.asarray(t + 1 - p, jnp.float32) ** length_penalty
        full = jnp.all(s["is_fin"], axis=1, keepdims=True) & early_stopping
        new = new + jnp.where(full, NEG, 0.0) + jnp.where(s["open"][:, None], 0.0, NEG) + jnp.where(just, 0.0, NEG)
        merged = jnp.concatenate([s["fin_scores"], new], axis=1)
        _, best = jax.lax.top_k(merged, k)
        fin = _gather_beams(jnp.concatenate([s["fin"], cand], axis=1), best)
        fin_scores = _gather_beams(merged, best)
        is_fin = _gather_beams(jnp.concatenate([s["is_fin"], just], axis=1), best)

        # Can the best running beam still beat the worst finished one (at the current length)?
        best_running = run_scores[:, :1] / jnp.asarray(t + 1 - p, jnp.float32) ** length_penalty
        worst = jnp.where(is_fin, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
        still_open = s["open"] & jnp.any(best_running > worst, axis=1)
        return dict(run=run, run_scores=run_scores, fin=fin, fin_scores=fin_scores, is_fin=is_fin, open=still_open)

    out = jax.lax.fori_loop(p, max_len, step, init)
    return out["fin"][:, 0], out["fin_scores"][:, 0]


def caption_train_loss(
    fwd: Callable, batch: dict[str, Array], rng: Array, *, bos_token_id: int, prompt_len: int = 1,
    label_smoothing: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """Decoder LM loss on captions (first token replaced by [DEC]); prompt tokens are not predicted.

    Batch keys: image (B,H,W,3), text_ids/text_mask (B,T).
    """
    del rng
    ids = batch["text_ids"].at[:, 0].set(bos_token_id)
    mask = batch["text_mask"]
    logits = fwd(Blip.decode, ids, mask, fwd(Blip.encode_image, batch["image"]))
    loss = lm_loss(logits, lm_targets(ids, mask, prompt_len), label_smoothing)
    return loss, {"loss": loss}
