"""Image-text retrieval as BLIP trains and evaluates it: ITC + ITM with hard negatives, ITM re-ranking, R@K."""

from __future__ import annotations

import dataclasses
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


# Logit of a candidate outside the pool: exp() underflows to 0, and 0 * it stays finite (unlike -inf).
OUTSIDE_POOL = -1e9


def same_shard(batch: int, shards: int) -> Array | None:
    """(B, B) True where two rows of the global batch sit on the same data-parallel shard; None for one shard.

    Under `jax.jit` the global batch is laid out over the data-parallel axes in `shards` contiguous blocks of
    B / shards rows (`parallel.mesh.batch_sharding`), one per device of the release's DDP run. Restricting a
    pool to the block diagonal therefore gives exactly the release's per-GPU pools (`negative_all_rank: False`,
    its in-batch ITC and ICE), whatever the mesh; every other row is unchanged.
    """
    if shards <= 1:
        return None
    if batch % shards:
        raise ValueError(f"global batch {batch} is not a multiple of the {shards} data-parallel shards")
    block = jnp.arange(batch) // (batch // shards)
    return block[:, None] == block[None, :]


@dataclasses.dataclass(frozen=True)
class Pools:
    """Which rows of the global batch a row draws on: the whole batch, or its own data-parallel shard (per GPU)."""

    shards: int = 1  # data-parallel shards of the global batch (the release's GPUs)
    negative_all_rank: bool = True  # ITM hard negatives from the global batch (False: from the row's shard)
    in_batch_all_rank: bool = True  # in-batch ITC candidates and ICE's mean over the global batch (False: per shard)

    def negatives(self, batch: int) -> Array | None:
        return None if self.negative_all_rank else same_shard(batch, self.shards)

    def in_batch(self, batch: int) -> Array | None:
        return None if self.in_batch_all_rank else same_shard(batch, self.shards)

    def ice(self, ice: Callable[[Array, Array], Array], pos_cls: Array, text_cls: Array) -> Array:
        return ice_per_shard(ice, pos_cls, text_cls, 1 if self.in_batch_all_rank else self.shards)


def in_pool(logits: Array, pool: Array | None) -> Array:
    """Logits with the candidates outside `pool` (a broadcastable bool mask; None = all) pushed to OUTSIDE_POOL."""
    return logits if pool is None else jnp.where(pool, logits, OUTSIDE_POOL)


def ice_per_shard(ice: Callable[[Array, Array], Array], pos_cls: Array, text_cls: Array, shards: int) -> Array:
    """ICE with the context mean taken over each data-parallel shard's own rows (the release's local batch mean)."""
    if shards <= 1:
        return ice(pos_cls, text_cls)
    split = lambda x: x.reshape(shards, -1, *x.shape[1:])
    return jax.vmap(ice)(split(pos_cls), split(text_cls)).reshape(pos_cls.shape)


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


def hard_negative_logits(sim: Array, pos: Array, eps: float = 0.0, pool: Array | None = None) -> Array:
    """log of `hard_negative_weights`, from log_softmax when eps = 0 so that no negative underflows to -inf.

    `pool` (bool, like sim; None = the whole row) limits the candidates, the softmax included, as the release's
    per-GPU sampling does with `negative_all_rank: False`.
    """
    logp = jax.nn.log_softmax(in_pool(sim.astype(jnp.float32), pool), axis=1)
    logw = logp if eps == 0.0 else jnp.log(jnp.exp(logp) + eps)
    outside = pos if pool is None else pos | ~pool
    return jnp.where(outside, -jnp.inf, logw)


def hard_negatives(
    rng: Array, sim_i2t: Array, sim_t2i: Array, pos: Array, eps: float = 0.0, pool: Array | None = None
) -> tuple[Array, Array]:
    """Sample one negative text per image and one negative image per text, by `hard_negative_weights`.

    One multinomial draw per row (torch.multinomial normalises the weights, as the categorical does), from the
    candidates in `pool` (None: the whole global batch, the release's `negative_all_rank: True`).
    Returns (negative text index for each image, negative image index for each text), global row indices.
    """
    k1, k2 = jax.random.split(rng)
    pool_t = None if pool is None else pool.T
    neg_text_for_image = jax.random.categorical(k1, _pooled_logits(sim_i2t, pos, eps, pool), axis=1)
    neg_image_for_text = jax.random.categorical(k2, _pooled_logits(sim_t2i, pos.T, eps, pool_t), axis=1)
    return neg_text_for_image, neg_image_for_text


def _pooled_logits(sim: Array, pos: Array, eps: float, pool: Array | None) -> Array:
    """Sampling logits from `pool`; a row whose pool holds no negative at all (a shard of one image's captions)
    draws from the whole batch instead of a positive (where the release's torch.multinomial would fail)."""
    logits = hard_negative_logits(sim, pos, eps, pool)
    if pool is None:
        return logits
    has_negative = jnp.isfinite(logits).any(axis=1, keepdims=True)
    return jnp.where(has_negative, logits, hard_negative_logits(sim, pos, eps))


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
    pools: Pools = Pools(),
) -> tuple[Array, dict[str, Array]]:
    """ITC + ITM with hard negatives on one (global) batch, as BLIP trains retrieval.

    `fwd(method, *args)` runs a stage of the (tuned) BLIP model. The batch is the global batch under
    `jax.jit`; `pools` says whether similarities, hard negatives and ICE span every data-parallel device
    (BLIP's all-gather) or each device's own rows. `ice(positive_cls, text_cls)` is Informative Context
    Enhancement, applied to positives. `temp` is clamped to TEMP_RANGE; `negative_eps` is
    `hard_negative_weights`' floor. Batch keys: image (B,H,W,3), text_ids/text_mask (B,T), image_index (B,).
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
    pool = pools.in_batch(ids.shape[0])
    pos_in = pos if pool is None else pos & pool
    loss_itc = itc_loss(in_pool(sim_i2t, pool), in_pool(sim_t2i, pool), soft_targets(pos_in), soft_targets(pos_in.T))
    loss_itm, acc = _itm_with_hard_negatives(fwd, batch, rng, image_embeds, text_embeds, sim_i2t, sim_t2i, pos,
                                             enc_token_id=enc_token_id, ice=ice, negative_eps=negative_eps,
                                             pools=pools)
    loss = loss_itc + itm_weight * loss_itm
    return loss, {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "itm_acc": acc}


def _itm_with_hard_negatives(
    fwd: Callable, batch: dict[str, Array], rng: Array, image_embeds: Array, text_embeds: Array, sim_i2t: Array,
    sim_t2i: Array, pos: Array, *, enc_token_id: int, ice: Callable[[Array, Array], Array] | None,
    negative_eps: float = 0.0, pools: Pools = Pools(),
) -> tuple[Array, Array]:
    """ITM loss and accuracy on [positives; hard-negative images; hard-negative texts] of the in-batch sims."""
    ids, mask = batch["text_ids"], batch["text_mask"]
    enc_ids = ids.at[:, 0].set(enc_token_id)
    neg_text, neg_image = hard_negatives(
        rng, jax.lax.stop_gradient(sim_i2t), jax.lax.stop_gradient(sim_t2i), pos, negative_eps,
        pools.negatives(ids.shape[0]),
    )
    pos_cls = fwd(Blip.encode_multimodal, enc_ids, mask, image_embeds)[:, 0]
    if ice is not None:
        pos_cls = pools.ice(ice, pos_cls, text_embeds[:, 0])
    neg_img_cls = fwd(Blip.encode_multimodal, enc_ids, mask, image_embeds[neg_image])[:, 0]
    neg_txt_cls = fwd(Blip.encode_multimodal, enc_ids[neg_text], mask[neg_text], image_embeds)[:, 0]
    logits = fwd(Blip.itm_logits, jnp.concatenate([pos_cls, neg_img_cls, neg_txt_cls], axis=0))
    labels = itm_labels(ids.shape[0])
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return itm_loss(logits, labels), acc


# ------------------------------------------------------------------------------ momentum distillation


def queue_targets(idx: Array, queue_idx: Array, pool: Array | None = None) -> Array:
    """Ground-truth ITC targets over [batch; queue]: every entry with the same image index is a positive
    (within `pool`, a (B, B + Q) candidate mask; None = all)."""
    pos = positive_mask(idx, jnp.concatenate([idx, queue_idx]))
    return soft_targets(pos if pool is None else pos & pool)


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
    in_batch: Array | None = None,
) -> Array:
    """ITC of online features against [in-batch momentum features; queue], with momentum-distilled targets.

    Targets = alpha * softmax(momentum similarity) + (1 - alpha) * positives by image index (queue included).
    `in_batch` (B, B) limits the in-batch candidates (the release: each GPU's own rows; the queue is shared).
    """
    # float32: the softmax runs over batch + queue (57,600 entries in BLIP), too many for bfloat16 logits
    image_feat, text_feat, image_feat_m, text_feat_m = (
        x.astype(jnp.float32) for x in (image_feat, text_feat, image_feat_m, text_feat_m))
    image_all = jnp.concatenate([image_feat_m, queues["image_feat"].astype(jnp.float32)])
    text_all = jnp.concatenate([text_feat_m, queues["text_feat"].astype(jnp.float32)])
    pool = None if in_batch is None else jnp.concatenate(
        [in_batch, jnp.ones((idx.shape[0], queues["idx"].shape[0]), bool)], axis=1)
    hard = queue_targets(idx, queues["idx"], pool)
    targets_i2t = distilled_targets(in_pool(image_feat_m @ text_all.T / temp, pool), hard, alpha)
    targets_t2i = distilled_targets(in_pool(text_feat_m @ image_all.T / temp, pool), hard, alpha)
    targets_i2t, targets_t2i = jax.lax.stop_gradient((targets_i2t, targets_t2i))
    sim_i2t = in_pool(image_feat @ text_all.T / temp, pool)
    sim_t2i = in_pool(text_feat @ image_all.T / temp, pool)
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
    pools: Pools = Pools(),
) -> tuple[Array, tuple[dict[str, Array], dict[str, Array]]]:
    """`retrieval_loss` with BLIP's momentum distillation for ITC -> (loss, (metrics, queues after enqueue)).

    `fwd_m` runs the momentum model. ITC compares online features with [momentum features; queue]; ITM is
    unchanged (hard negatives from the in-batch online similarities). The batch's momentum features are
    then enqueued (the global batch, as BLIP's all-gather). `temp` is clamped to TEMP_RANGE; `pools` as in
    `retrieval_loss`.
    """
    temp = clamp_temp(temp)
    ids, mask, idx = batch["text_ids"], batch["text_mask"], batch["image_index"]
    image_embeds = fwd(Blip.encode_image, batch["image"])
    image_feat = fwd(Blip.image_feat, image_embeds)
    text_embeds = fwd(Blip.encode_text, ids, mask)
    text_feat = fwd(Blip.text_feat, text_embeds)
    image_feat_m = jax.lax.stop_gradient(fwd_m(Blip.image_feat, fwd_m(Blip.encode_image, batch["image"])))
    text_feat_m = jax.lax.stop_gradient(fwd_m(Blip.text_feat, fwd_m(Blip.encode_text, ids, mask)))
    loss_itc = momentum_itc(image_feat, text_feat, image_feat_m, text_feat_m, idx, queues, temp=temp, alpha=alpha,
                            in_batch=pools.in_batch(idx.shape[0]))

    sim_i2t = image_feat @ text_feat.T / temp
    pos = positive_mask(idx, idx)
    loss_itm, acc = _itm_with_hard_negatives(fwd, batch, rng, image_embeds, text_embeds, sim_i2t, sim_i2t.T, pos,
                                             enc_token_id=enc_token_id, ice=ice, negative_eps=negative_eps,
                                             pools=pools)
    loss = loss_itc + itm_weight * loss_itm
    metrics = {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "itm_acc": acc,
               "alpha": jnp.asarray(alpha, jnp.float32)}
    return loss, (metrics, enqueue(queues, image_feat_m, text_feat_m, idx))
