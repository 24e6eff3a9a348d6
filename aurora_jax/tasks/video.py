"""Text-video retrieval and video QA as Aurora's release computes them (WillDreamer/Aurora CP/blip_retrieval.py,
CP/blip_vqa.py, train_video_retrieval.py): BLIP over the frames of a clip.

Every frame goes through the (tuned) ViT in one batched call of B*T images. ITC compares the text with the clip
feature, vision_proj of the mean of the frame [CLS] tokens, normalised; ITM and the VQA question encoder
cross-attend to the concatenated tokens of all frames (B, T*N, d). With frame-aware attention (the release's
`frame_aware_attention`, on for MSRVTT and DiDeMo) the ITM's cross-attention keys of each frame are weighted by the
text's similarity to that frame (`models.bert.frame_weights`). Frame order is not seen by the model: no temporal
embedding, as in every release config (`temporal_embed: False`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.models.blip import Blip
from aurora_jax.tasks.momentum import enqueue
from aurora_jax.tasks.retrieval import (
    Pools,
    clamp_temp,
    hard_negatives,
    in_pool,
    itc_loss,
    itm_labels,
    itm_loss,
    momentum_itc,
    positive_mask,
    recall_at_k,
    soft_targets,
)
from aurora_jax.tasks.vqa import vqa_train_loss

Array = jax.Array
GLOBAL_POOLS = Pools()  # every pool spans the global batch (the release's negative_all_rank: True)


# -------------------------------------------------------------------------------------------- features


def encode_frames(fwd: Callable, video: Array) -> Array:
    """Clips (B, T, S, S, 3) -> frame tokens (B, T, N, d), all frames in one ViT call."""
    if video.ndim != 5:
        raise ValueError(f"video must be (batch, frames, size, size, 3), got shape {video.shape}")
    b, t = video.shape[:2]
    tokens = fwd(Blip.encode_image, video.reshape(b * t, *video.shape[2:]))
    return tokens.reshape(b, t, *tokens.shape[1:])


def flat_frames(frame_tokens: Array) -> Array:
    """(B, T, N, d) -> (B, T*N, d): the frames' tokens one after another, as the cross-attention sees them."""
    b, t, n, d = frame_tokens.shape
    return frame_tokens.reshape(b, t * n, d)


def video_feat(fwd: Callable, frame_tokens: Array) -> Array:
    """Normalised ITC clip feature: vision_proj of the mean over frames of the raw [CLS] tokens (release order)."""
    mean_cls = jnp.mean(frame_tokens[:, :, 0, :], axis=1)
    return fwd(Blip.image_feat, mean_cls[:, None, :])


def frame_feat(fwd: Callable, frame_tokens: Array) -> Array:
    """Normalised ITC feature of every frame's [CLS] (B, T, D), for the frame-aware weights."""
    b, t, _, d = frame_tokens.shape
    return fwd(Blip.image_feat, frame_tokens[:, :, :1, :].reshape(b * t, 1, d)).reshape(b, t, -1)


def text_frame_sim(text_feat: Array, frame_feats: Array) -> Array:
    """(B, D) x (B, T, D) -> (B, T): each text against each frame of its paired clip (release's sim_t2f)."""
    return jnp.einsum("bc,btc->bt", text_feat, frame_feats)


# ------------------------------------------------------------------------------------------- retrieval


def video_itm_logits(
    fwd: Callable, batch: Mapping[str, Array], frame_tokens: Array, frame_feats: Array, text_feat: Array,
    text_cls: Array, neg_text: Array, neg_video: Array, *, enc_token_id: int,
    ice: Callable[[Array, Array], Array] | None = None, frame_aware: bool = True,
) -> Array:
    """ITM logits (3B, 2) of [positives; (text b, clip neg_video[b]); (text neg_text[b], clip b)].

    With `frame_aware`, every pair's cross-attention is weighted by its own text against its own clip's frames:
    a negative clip brings its frame features, a negative text its ITC feature (the release's pairing).
    ICE (`ice(positive_cls, text_cls)`) acts on the positives only.
    """
    enc_ids = batch["text_ids"].at[:, 0].set(enc_token_id)
    mask = batch["text_mask"]
    tokens = flat_frames(frame_tokens)
    pos_sim = neg_sim = None
    if frame_aware:
        pos_sim = text_frame_sim(text_feat, frame_feats)
        neg_sim = text_frame_sim(jnp.concatenate([text_feat, text_feat[neg_text]]),
                                 jnp.concatenate([frame_feats[neg_video], frame_feats]))
    pos_cls = fwd(Blip.encode_multimodal, enc_ids, mask, tokens, frame_sim=pos_sim)[:, 0]
    if ice is not None:
        pos_cls = ice(pos_cls, text_cls)
    neg_ids = jnp.concatenate([enc_ids, enc_ids[neg_text]])
    neg_mask = jnp.concatenate([mask, mask[neg_text]])
    neg_tokens = jnp.concatenate([tokens[neg_video], tokens])
    neg_cls = fwd(Blip.encode_multimodal, neg_ids, neg_mask, neg_tokens, frame_sim=neg_sim)[:, 0]
    return fwd(Blip.itm_logits, jnp.concatenate([pos_cls, neg_cls], axis=0))


def video_itm_with_hard_negatives(
    fwd: Callable, batch: Mapping[str, Array], rng: Array, frame_tokens: Array, frame_feats: Array,
    text_feat: Array, text_cls: Array, sim_v2t: Array, pos: Array, *, enc_token_id: int,
    ice: Callable[[Array, Array], Array] | None = None, negative_eps: float = 0.0, frame_aware: bool = True,
    pools: Pools = GLOBAL_POOLS,
) -> tuple[Array, Array]:
    """ITM loss and accuracy with negatives drawn as in image retrieval (`hard_negatives` on in-batch sims,
    from `pools.negatives`; ICE's context mean over `pools`' in-batch rows)."""
    neg_text, neg_video = hard_negatives(
        rng, jax.lax.stop_gradient(sim_v2t), jax.lax.stop_gradient(sim_v2t.T), pos, negative_eps,
        pools.negatives(pos.shape[0]))
    logits = video_itm_logits(fwd, batch, frame_tokens, frame_feats, text_feat, text_cls, neg_text, neg_video,
                              enc_token_id=enc_token_id, ice=None if ice is None else partial(pools.ice, ice),
                              frame_aware=frame_aware)
    labels = itm_labels(batch["text_ids"].shape[0])
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return itm_loss(logits, labels), acc


def _video_text_features(fwd: Callable, batch: Mapping[str, Array]):
    frame_tokens = encode_frames(fwd, batch["video"])
    text_embeds = fwd(Blip.encode_text, batch["text_ids"], batch["text_mask"])
    return (frame_tokens, video_feat(fwd, frame_tokens), frame_feat(fwd, frame_tokens), text_embeds,
            fwd(Blip.text_feat, text_embeds))


def video_retrieval_loss(
    fwd: Callable, batch: Mapping[str, Array], rng: Array, *, temp: Array | float, enc_token_id: int,
    ice: Callable[[Array, Array], Array] | None = None, itm_weight: float = 1.0, negative_eps: float = 0.0,
    frame_aware: bool = True, pools: Pools = GLOBAL_POOLS,
) -> tuple[Array, dict[str, Array]]:
    """Video ITC (clip feature = mean of frame [CLS]) + ITM with hard negatives, on one global batch.

    Batch keys: video (B, T, S, S, 3), text_ids/text_mask (B, L), image_index (B,) (the clip's index).
    `pools` as in `retrieval.retrieval_loss`.
    """
    temp = clamp_temp(temp)
    frame_tokens, vid_feat, frames, text_embeds, txt_feat = _video_text_features(fwd, batch)
    sim_v2t = vid_feat @ txt_feat.T / temp
    pos = positive_mask(batch["image_index"], batch["image_index"])
    pool = pools.in_batch(pos.shape[0])
    pos_in = pos if pool is None else pos & pool
    loss_itc = itc_loss(in_pool(sim_v2t, pool), in_pool(sim_v2t.T, pool), soft_targets(pos_in),
                        soft_targets(pos_in.T))
    loss_itm, acc = video_itm_with_hard_negatives(
        fwd, batch, rng, frame_tokens, frames, txt_feat, text_embeds[:, 0], sim_v2t, pos, enc_token_id=enc_token_id,
        ice=ice, negative_eps=negative_eps, frame_aware=frame_aware, pools=pools)
    loss = loss_itc + itm_weight * loss_itm
    return loss, {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "itm_acc": acc}


def video_retrieval_loss_distilled(
    fwd: Callable, fwd_m: Callable, batch: Mapping[str, Array], rng: Array, queues: dict[str, Array], *,
    alpha: Array | float, temp: Array | float, enc_token_id: int, ice: Callable[[Array, Array], Array] | None = None,
    itm_weight: float = 1.0, negative_eps: float = 0.0, frame_aware: bool = True, pools: Pools = GLOBAL_POOLS,
) -> tuple[Array, tuple[dict[str, Array], dict[str, Array]]]:
    """`video_retrieval_loss` with momentum distillation for ITC (the release's video training always has it).

    The momentum clip feature is the momentum model's vision_proj of the mean momentum [CLS]; ITC, queues and
    targets are image retrieval's (`momentum_itc`, `enqueue`); ITM is unchanged.
    """
    temp = clamp_temp(temp)
    idx = batch["image_index"]
    frame_tokens, vid_feat, frames, text_embeds, txt_feat = _video_text_features(fwd, batch)
    vid_feat_m = jax.lax.stop_gradient(video_feat(fwd_m, encode_frames(fwd_m, batch["video"])))
    txt_feat_m = jax.lax.stop_gradient(
        fwd_m(Blip.text_feat, fwd_m(Blip.encode_text, batch["text_ids"], batch["text_mask"])))
    loss_itc = momentum_itc(vid_feat, txt_feat, vid_feat_m, txt_feat_m, idx, queues, temp=temp, alpha=alpha,
                            in_batch=pools.in_batch(idx.shape[0]))
    sim_v2t = vid_feat @ txt_feat.T / temp
    loss_itm, acc = video_itm_with_hard_negatives(
        fwd, batch, rng, frame_tokens, frames, txt_feat, text_embeds[:, 0], sim_v2t, positive_mask(idx, idx),
        enc_token_id=enc_token_id, ice=ice, negative_eps=negative_eps, frame_aware=frame_aware, pools=pools)
    loss = loss_itc + itm_weight * loss_itm
    metrics = {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "itm_acc": acc,
               "alpha": jnp.asarray(alpha, jnp.float32)}
    return loss, (metrics, enqueue(queues, vid_feat_m, txt_feat_m, idx))


def median_rank(scores: np.ndarray, targets: Sequence[int]) -> float:
    """Median over rows of the 1-based rank of the row's target column (the release's vid_mdR)."""
    ranks = [int(np.where(np.argsort(-row, kind="stable") == t)[0][0]) for row, t in zip(scores, targets)]
    return float(np.median(np.asarray(ranks) + 1))


def video_recall(
    scores_v2t: np.ndarray, scores_t2v: np.ndarray, vid2txt: Sequence[Sequence[int]], txt2vid: Sequence[int],
) -> dict[str, float]:
    """train_video_retrieval.py's metrics: txt_r1/5/10 (clip -> text), vid_r1/5/10 (text -> clip), means, vid_mdR."""
    out = {k.replace("img_", "vid_"): v for k, v in recall_at_k(scores_v2t, scores_t2v, vid2txt, txt2vid).items()}
    out["vid_mdR"] = median_rank(scores_t2v, txt2vid)
    return out


# ------------------------------------------------------------------------------------------------- QA


def video_fwd(fwd: Callable) -> Callable:
    """`fwd` whose `Blip.encode_image` stage takes clips (B, T, S, S, 3) and returns the concatenated frame
    tokens (B, T*N, d): the image VQA code then runs on video unchanged (as the release's blip_vqa.py does)."""

    def run(method, *args, **kwargs):
        if method is Blip.encode_image:
            return flat_frames(encode_frames(fwd, *args, **kwargs))
        return fwd(method, *args, **kwargs)

    return run


def video_qa_train_loss(
    fwd: Callable, batch: Mapping[str, Array], rng: Array, *, enc_token_id: int, bos_token_id: int,
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """The VQA answer-weighted loss (`vqa_train_loss`) with the question encoder over all frames' tokens.

    Batch keys: video (B, T, S, S, 3) and the image VQA batch's question/answer fields.
    """
    return vqa_train_loss(video_fwd(fwd), {**batch, "image": batch["video"]}, rng, enc_token_id=enc_token_id,
                          bos_token_id=bos_token_id, label_smoothing=label_smoothing)


def accuracy_by_type(scores: Mapping[int, float], types: Mapping[int, str]) -> dict[str, float]:
    """Mean score (percent) of each question type: {"<type>_acc": ...}; questions without a type are skipped."""
    groups: dict[str, list[float]] = {}
    for qid, score in scores.items():
        if qid in types:
            groups.setdefault(str(types[qid]), []).append(score)
    return {f"{name}_acc": 100.0 * float(np.mean(v)) for name, v in sorted(groups.items())}
