"""VQA as BLIP does it: question encoder + answer decoder, answer-weighted loss, answer-list ranking."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aurora_jax.models.blip import Blip
from aurora_jax.tasks.caption import IGNORE, lm_loss_per_sequence, lm_targets

Array = jax.Array


def vqa_loss(
    answer_logits: Array,
    answer_ids: Array,
    answer_mask: Array,
    weights: Array,
    num_questions: int,
    label_smoothing: float = 0.1,
) -> Array:
    """sum_answers weight * NLL(answer | question) / num_questions (BLIP's answer-weighted loss).

    Each row is one (question, answer) pair; `weights` gives each answer's share of the annotators.
    """
    targets = lm_targets(answer_ids, answer_mask)
    nll = lm_loss_per_sequence(answer_logits, targets, label_smoothing)
    return jnp.sum(weights * nll) / num_questions


def answer_log_likelihood(answer_logits: Array, answer_ids: Array, answer_mask: Array) -> Array:
    """log p(answer tokens | [DEC], question) per row, without label smoothing."""
    return -lm_loss_per_sequence(answer_logits, lm_targets(answer_ids, answer_mask))


def rank_answers(
    decode_fn: Callable[[Array, Array, Array, Array], Array],
    question_states: Array,
    question_mask: Array,
    answer_ids: Array,
    answer_mask: Array,
    k: int,
) -> Array:
    """Pick each question's answer from a fixed list: top-k by first-token probability, then by full likelihood.

    `decode_fn(ids, mask, states, states_mask)` -> logits. `answer_ids` (A, L) all start with [DEC].
    Returns the index into the answer list for each question.
    """
    nq = question_states.shape[0]
    k = min(k, answer_ids.shape[0])
    bos = answer_ids[:1, :1].repeat(nq, axis=0)
    first = decode_fn(bos, jnp.ones_like(bos), question_states, question_mask)[:, 0]
    first_logp = jax.nn.log_softmax(first.astype(jnp.float32), axis=-1)[:, answer_ids[:, 1]]  # (nq, A)
    _, top = jax.lax.top_k(first_logp, k)  # (nq, k)
    ids = answer_ids[top].reshape(nq * k, -1)
    mask = answer_mask[top].reshape(nq * k, -1)
    states = jnp.repeat(question_states, k, axis=0)
    smask = jnp.repeat(question_mask, k, axis=0)
    ll = answer_log_likelihood(decode_fn(ids, mask, states, smask), ids, mask).reshape(nq, k)
    return jnp.take_along_axis(top, jnp.argmax(ll, axis=1)[:, None], axis=1)[:, 0]


__all__ = ["IGNORE", "vqa_loss", "answer_log_likelihood", "rank_answers"]


def vqa_train_loss(
    fwd: Callable, batch: dict[str, Array], rng: Array, *, enc_token_id: int, bos_token_id: int,
    label_smoothing: float = 0.1,
) -> tuple[Array, dict[str, Array]]:
    """Question encoder + answer decoder loss on a batch with A candidate answers per question.

    Batch keys: image (B,H,W,3), question_ids/question_mask (B,T), answer_ids/answer_mask (B,A,L) as the
    tokenizer writes them ([CLS] first), answer_weights (B,A) (zero for padding answers). The questions start
    with [ENC] and the answers with [DEC] (`bos_token_id`), as BLIP's blip_vqa.py sets them and as evaluation
    decodes from.
    """
    del rng
    qids = batch["question_ids"].at[:, 0].set(enc_token_id)
    qmask = batch["question_mask"]
    b, a, length = batch["answer_ids"].shape
    image_embeds = fwd(Blip.encode_image, batch["image"])
    q = fwd(Blip.encode_multimodal, qids, qmask, image_embeds)
    aids = batch["answer_ids"].reshape(b * a, length).at[:, 0].set(bos_token_id)
    amask = batch["answer_mask"].reshape(b * a, length)
    logits = fwd(Blip.decode, aids, amask, jnp.repeat(q, a, axis=0), jnp.repeat(qmask, a, axis=0))
    loss = vqa_loss(logits, aids, amask, batch["answer_weights"].reshape(-1), b, label_smoothing)
    return loss, {"loss": loss}
