"""Image-text retrieval as BLIP trains and evaluates it: ITC + ITM with hard negatives, ITM re-ranking, R@K."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.models.blip import Blip
from aurora_jax.tasks.momentum import enqueue

Array = jax.Array


def positive_mask(image_ids: Array, text_ids: Array) -> Array:
    """(B_img, B_txt) True where an image and a text belong to the same sample (same image id)."""
    return image_ids[:, None] == text_ids[None, :]


def soft_targets(pos: Array) -> Array:
    """Row-normalised positive mask: several captions of one image share the target mass."""
    pos = pos.astype(jnp.float32)
    return pos / jnp.sum(pos, axis=1, keepdims=True)


TEMP_RANGE = (0.001, 0.5)  # the release clamps its ITC temperature to this before every forward


def clamp_temp(temp: Array | float, lo: float = TEMP_RANGE[0], hi: float = TEMP_RANGE[1]) -> Array:
    """The temperature clipped to [lo, hi] in value, with the gradient of the unclipped one (straight-through).

    The release clamps the parameter itself in place (no gradient) and then differentiates at the clamped
    value; a plain jnp.clip would instead give zero gradient outside the range and strand a trained temp there.
    """
    temp = jnp.asarray(temp, jnp.float32)
    return temp + jax.lax.stop_gradient(jnp.clip(temp, lo, hi) - temp)


def itc_loss(sim_i2t: Array, sim_t2i: Array, targets_i2t: Array, targets_t2i: Array) -> Array:
    """Symmetric contrastive loss on temperature-scaled similarities against (soft) targets."""
    loss_i2t = -jnp.sum(jax.nn.log_softmax(sim_i2t, axis=1) * targets_i2t, axis=1).mean()
    loss_t2i = -jnp.sum(jax.nn.log_softmax(sim_t2i, axis=1) * targets_t2i, axis=1).mean()
    return (loss_i2t + loss_t2i) / 2


def distilled_targets(sim_m: Array, hard: Array, alpha: Array | float) -> Array:
    """Momentum distillation: alpha * softmax(momentum similarity) + (1 - alpha) * ground truth."""
    return alpha * jax.nn.softmax(sim_m, axis=1) + (1 - alpha) * hard


def hard_negative_weights(sim: Array, pos: Array, eps: float = 0.0) -> Array:
    """Sampling weights of the negatives of each row: softmax(sim) + eps, positives set to 0 (unnormalised).

    eps = 0 is the release's fine-tuning rule (WillDreamer/Aurora CP/blip_retrieval.py); eps = 1e-4 is
    Salesforce BLIP's pre-training rule, which keeps every negative drawable.
    """
    return jnp.where(pos, 0.0, jax.nn.softmax(sim.astype(jnp.float32), axis=1) + eps)


def hard_negative_logits(sim: Array, pos: Array, eps: float = 0.0) -> Array:
    """log of `hard_negative_weights`, from log_softmax when eps = 0 so that no negative underflows to -inf."""
    logp = jax.nn.log_softmax(sim.astype(jnp.float32), axis=1)
    logw = logp if eps == 0.0 else jnp.log(jnp.exp(logp) + eps)
    return jnp.where(pos, -jnp.inf, logw)


def hard_negatives(rng: Array, sim_i2t: Array, sim_t2i: Array, pos: Array, eps: float = 0.0) -> tuple[Array, Array]:
    """Sample one negative text per image and one negative image per text, by `hard_negative_weights`.

    One multinomial draw per row (torch.multinomial normalises the weights, as the categorical does).
    Returns (negative text index for each image, negative image index for each text).
    """
    k1, k2 = jax.random.split(rng)
    neg_text_for_image = jax.random.categorical(k1, hard_negative_logits(sim_i2t, pos, eps), axis=1)
    neg_image_for_text = jax.random.categorical(k2, hard_negative_logits(sim_t2i, pos.T, eps), axis=1)
    return neg_text_for_image, neg_image_for_text


def itm_loss(logits: Array, labels: Array) -> Array:
    """Binary image-text matching cross-entropy on (N, 2) logits."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1))


def itm_labels(batch: int) -> Array:
    """Labels of the ITM batch [positives; image-negatives; text-negatives]."""
    return jnp.concatenate([jnp.ones((batch,), jnp.int32), jnp.zeros((2 * batch,), jnp.int32)])


def rerank_top_k(
    sims: np.ndarray, k: int, score_pairs: Callable[[int, np.ndarray], np.ndarray], sim_weight: float = 0.0
) -> np.ndarray:
    """BLIP's evaluation: for each row keep the k most similar columns, score them ITM + sim_weight * ITC sim.

    `score_pairs(row, cols)` returns the ITM match logits of row against cols. Other entries are -100.
    sim_weight is the release's `beta`: 0 (ITM alone) in all its image-retrieval configs.
    """
    out = np.full(sims.shape, -100.0, dtype=np.float32)
    k = min(k, sims.shape[1])
    for row in range(sims.shape[0]):
        cols = np.argsort(-sims[row], kind="stable")[:k]
        out[row, cols] = np.asarray(score_pairs(row, cols)) + sim_weight * sims[row, cols]
    return out


def recall_at_k(
    scores_i2t: np.ndarray,
    scores_t2i: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Text retrieval (TR@k: an image finds any of its captions) and image retrieval (IR@k), in percent."""
    tr_ranks = np.empty(scores_i2t.shape[0])
    for i, row in enumerate(scores_i2t):
        order = np.argsort(-row, kind="stable")
        tr_ranks[i] = min(int(np.where(order == t)[0][0]) for t in img2txt[i])
    ir_ranks = np.empty(scores_t2i.shape[0])
    for t, row in enumerate(scores_t2i):
        order = np.argsort(-row, kind="stable")
        ir_ranks[t] = int(np.where(order == txt2img[t])[0][0])
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * float(np.mean(tr_ranks < k))
        out[f"img_r{k}"] = 100.0 * float(np.mean(ir_ranks < k))
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def retrieval_loss(
    fwd: Callable,
    batch: dict[str, Array],
    rng: Array,
    *,
    temp: Array | float,
    enc_token_id: int,
    ice: Callable[[Array, Array], Array] | None = None,
    itm_weight: float = 1.0,
    negative_eps: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """ITC + ITM with hard negatives on one (global) batch, as BLIP trains retrieval.

    `fwd(method, *args)` runs a stage of the (tuned) BLIP model. The batch is the global batch under
    `jax.jit`, so similarities and hard negatives already span every data-parallel device (BLIP's
    all-gather). `ice(positive_cls, text_cls)` is Informative Context Enhancement, applied to positives.
    `temp` is clamped to TEMP_RANGE; `negative_eps` is `hard_negative_weights`' floor.
    Batch keys: image (B,H,W,3), text_ids/text_mask (B,T), image_index (B,).
    """
    temp = clamp_temp(temp)
    ids, mask = batch["text_ids"], batch["text_mask"]
    image_embeds = fwd(Blip.encode_image, batch["image"])
    image_feat = fwd(Blip.image_feat, image_embeds)
    text_embeds = fwd(Blip.encode_text, ids, mask)
    text_feat = fwd(Blip.text_feat, text_embeds)
    sim_i2t = image_feat @ text_feat.T / temp
    sim_t2i = sim_i2t.T
    pos = positive_mask(batch["image_index"], batch["image_index"])
    loss_itc = itc_loss(sim_i2t, sim_t2i, soft_targets(pos), soft_targets(pos.T))
    loss_itm, acc = _itm_with_hard_negatives(fwd, batch, rng, image_embeds, text_embeds, sim_i2t, sim_t2i, pos,
                                             enc_token_id=enc_token_id, ice=ice, negative_eps=negative_eps)
    loss = loss_itc + itm_weight * loss_itm
    return loss, {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "itm_acc": acc}


def _itm_with_hard_negatives(
    fwd: Callable, batch: dict[str, Array], rng: Array, image_embeds: Array, text_embeds: Array, sim_i2t: Array,
    sim_t2i: Array, pos: Array, *, enc_token_id: int, ice: Callable[[Array, Array], Array] | None,
    negative_eps: float = 0.0,
) -> tuple[Array, Array]:
    """ITM loss and accuracy on [positives; hard-negative images; hard-negative texts] of the in-batch sims."""
    ids, mask = batch["text_ids"], batch["text_mask"]
    enc_ids = ids.at[:, 0].set(enc_token_id)
    neg_text, neg_image = hard_negatives(
        rng, jax.lax.stop_gradient(sim_i2t), jax.lax.stop_gradient(sim_t2i), pos, negative_eps
    )
    pos_cls = fwd(Blip.encode_multimodal, enc_ids, mask, image_embeds)[:, 0]
    if ice is not None:
        pos_cls = ice(pos_cls, text_embeds[:, 0])
    neg_img_cls = fwd(Blip.encode_multimodal, enc_ids, mask, image_embeds[neg_image])[:, 0]
    neg_txt_cls = fwd(Blip.encode_multimodal, enc_ids[neg_text], mask[neg_text], image_embeds)[:, 0]
    logits = fwd(Blip.itm_logits, jnp.concatenate([pos_cls, neg_img_cls, neg_txt_cls], axis=0))
    labels = itm_labels(ids.shape[0])
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return itm_loss(logits, labels), acc


# ------------------------------------------------------------------------------ momentum distillation


def queue_targets(idx: Array, queue_idx: Array) -> Array:
    """Ground-truth ITC targets over [batch; queue]: every entry with the same image index is a positive."""
    return soft_targets(positive_mask(idx, jnp.concatenate([idx, queue_idx])))


def momentum_itc(
    image_feat: Array,
    text_feat: Array,
    image_feat_m: Array,
    text_feat_m: Array,
    idx: Array,
    queues: dict[str, Array],
    *,
    temp: Array | float,
    alpha: Array | float,
) -> Array:
    """ITC of online features against [in-batch momentum features; queue], with momentum-distilled targets.

    Targets = alpha * softmax(momentum similarity) + (1 - alpha) * positives by image index (queue included).
    """
    # float32: the softmax runs over batch + queue (57,600 entries in BLIP), too many for bfloat16 logits
    image_feat, text_feat, image_feat_m, text_feat_m = (
        x.astype(jnp.float32) for x in (image_feat, text_feat, image_feat_m, text_feat_m))
    image_all = jnp.concatenate([image_feat_m, queues["image_feat"].astype(jnp.float32)])
    text_all = jnp.concatenate([text_feat_m, queues["text_feat"].astype(jnp.float32)])
    hard = queue_targets(idx, queues["idx"])
    targets_i2t = distilled_targets(image_feat_m @ text_all.T / temp, hard, alpha)
    targets_t2i = distilled_targets(text_feat_m @ image_all.T / temp, hard, alpha)
    targets_i2t, targets_t2i = jax.lax.stop_gradient((targets_i2t, targets_t2i))
    sim_i2t = image_feat @ text_all.T / temp
    sim_t2i = text_feat @ image_all.T / temp
    return itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)


def retrieval_loss_distilled(
    fwd: Callable,
    fwd_m: Callable,
    batch: dict[str, Array],
    rng: Array,
    queues: dict[str, Array],
    *,
    alpha: Array | float,
    temp: Array | float,
    enc_token_id: int,
    ice: Callable[[Array, Array], Array] | None = None,
    itm_weight: float = 1.0,
    negative_eps: float = 0.0,
) -> tuple[Array, tuple[dict[str, Array], dict[str, Array]]]:
    """`retrieval_loss` with BLIP's momentum distillation for ITC -> (loss, (metrics, queues after enqueue)).

    `fwd_m` runs the momentum model. ITC compares online features with [momentum features; queue]; ITM is
    unchanged (hard negatives from the in-batch online similarities). The batch's momentum features are
    then enqueued (the global batch, as BLIP's all-gather). `temp` is clamped to TEMP_RANGE.
    """
    temp = clamp_temp(temp)
    ids, mask, idx = batch["text_ids"], batch["text_mask"], batch["image_index"]
    image_embeds = fwd(Blip.encode_image, batch["image"])
    image_feat = fwd(Blip.image_feat, image_embeds)
    text_embeds = fwd(Blip.encode_text, ids, mask)
    text_feat = fwd(Blip.text_feat, text_embeds)
    image_feat_m = jax.lax.stop_gradient(fwd_m(Blip.image_feat, fwd_m(Blip.encode_image, batch["image"])))
    text_feat_m = jax.lax.stop_gradient(fwd_m(Blip.text_feat, fwd_m(Blip.encode_text, ids, mask)))
    loss_itc = momentum_itc(image_feat, text_feat, image_feat_m, text_feat_m, idx, queues, temp=temp, alpha=alpha)

    sim_i2t = image_feat @ text_feat.T / temp
    pos = positive_mask(idx, idx)
    loss_itm, acc = _itm_with_hard_negatives(fwd, batch, rng, image_embeds, text_embeds, sim_i2t, sim_i2t.T, pos,
                                             enc_token_id=enc_token_id, ice=ice, negative_eps=negative_eps)
    loss = loss_itc + itm_weight * loss_itm
    metrics = {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "itm_acc": acc,
               "alpha": jnp.asarray(alpha, jnp.float32)}
    return loss, (metrics, enqueue(queues, image_feat_m, text_feat_m, idx))
