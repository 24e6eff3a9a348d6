"""Evaluation of the tuned model: retrieval R@K with ITM re-ranking, VQA accuracy, caption test loss."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from aurora_jax.models.blip import Blip, BlipConfig
from aurora_jax.peft import PeftConfig, combine, tuned_forward
from aurora_jax.tasks.caption import greedy_decode, lm_loss, lm_targets
from aurora_jax.tasks.retrieval import recall_at_k, rerank_top_k
from aurora_jax.tasks.vqa import rank_answers


def _fwd(model, peft_cfg, trainable, frozen):
    base, adapter = combine(trainable, frozen, stop_gradient=False)
    return tuned_forward(model, base, adapter, peft_cfg, deterministic=True)


def _pad_rows(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    n = x.shape[0]
    pad = (-n) % multiple
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
    return x, n


def _batched(fn, arrays: list[np.ndarray], batch: int) -> np.ndarray:
    """Apply a jitted fn over fixed-size row chunks (one compilation), concatenating the outputs."""
    n = arrays[0].shape[0]
    outs = []
    for start in range(0, n, batch):
        chunk = [a[start:start + batch] for a in arrays]
        chunk_padded = [_pad_rows(c, batch)[0] for c in chunk]
        outs.append(np.asarray(fn(*chunk_padded))[: chunk[0].shape[0]])
    return np.concatenate(outs, axis=0)


def evaluate(
    config: mlc.ConfigDict, model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable: Any, frozen: Any,
    data: Any, mesh: Any,
) -> dict[str, float]:
    if config.task == "retrieval":
        return evaluate_retrieval(model, cfg, peft_cfg, trainable, frozen, data, k_test=config.eval.k_test,
                                  batch=config.eval.batch_size)
    if config.task == "vqa":
        return evaluate_vqa(model, cfg, peft_cfg, trainable, frozen, data, k=config.eval.k_test,
                            mode=config.eval.vqa_mode)
    return evaluate_caption(model, cfg, peft_cfg, trainable, frozen, data, batch=config.eval.batch_size)


def _images(data) -> tuple[np.ndarray, np.ndarray]:
    """Every evaluation image with its index, padding rows (valid=0) dropped."""
    images, index = [], []
    for b in data.eval_images:
        keep = np.asarray(b["valid"]).astype(bool)
        images.append(b["image"][keep])
        index.append(b["image_index"][keep])
    return np.concatenate(images), np.concatenate(index)


def evaluate_retrieval(
    model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable, frozen, data, *, k_test: int, batch: int
) -> dict[str, float]:
    """BLIP's protocol: ITC similarity for all pairs, the top k_test re-scored by ITM (+ ITC), R@1/5/10."""

    @jax.jit
    def embed_images(trainable, frozen, pixels):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        embeds = fwd(Blip.encode_image, pixels)
        return embeds, fwd(Blip.image_feat, embeds)

    @jax.jit
    def embed_texts(trainable, frozen, ids, mask):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        return fwd(Blip.text_feat, fwd(Blip.encode_text, ids, mask))

    @jax.jit
    def itm_match(trainable, frozen, image_embeds, ids, mask):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        ids = ids.at[:, 0].set(cfg.enc_token_id)
        cls = fwd(Blip.encode_multimodal, ids, mask, image_embeds)[:, 0]
        return fwd(Blip.itm_logits, cls)[:, 1]

    pixels, order = _images(data)
    pixels = pixels[np.argsort(order)]
    embeds, img_feat = [], []
    for start in range(0, len(pixels), batch):
        chunk, n = _pad_rows(pixels[start:start + batch], batch)
        e, f = embed_images(trainable, frozen, chunk)
        embeds.append(np.asarray(e)[:n])
        img_feat.append(np.asarray(f)[:n])
    embeds, img_feat = np.concatenate(embeds), np.concatenate(img_feat)
    txt_feat = _batched(partial(embed_texts, trainable, frozen), [data.eval_text_ids, data.eval_text_mask], batch)
    sims = img_feat @ txt_feat.T
    k = min(k_test, sims.shape[1], sims.shape[0])

    def i2t(row, cols):
        return itm_match(trainable, frozen, np.repeat(embeds[row:row + 1], len(cols), 0),
                         data.eval_text_ids[cols], data.eval_text_mask[cols])

    def t2i(row, cols):
        ids = np.repeat(data.eval_text_ids[row:row + 1], len(cols), 0)
        mask = np.repeat(data.eval_text_mask[row:row + 1], len(cols), 0)
        return itm_match(trainable, frozen, embeds[cols], ids, mask)

    scores_i2t = rerank_top_k(sims, k, i2t)
    scores_t2i = rerank_top_k(sims.T, k, t2i)
    out = recall_at_k(scores_i2t, scores_t2i, data.img2txt, data.txt2img)
    itc_only = recall_at_k(sims, sims.T, data.img2txt, data.txt2img)
    out["itc_r_mean"] = itc_only["r_mean"]
    return out


def evaluate_vqa(
    model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable, frozen, data, *, k: int, mode: str = "rank"
) -> dict[str, float]:
    """VQA accuracy (the standard min(#matches/3, 1) metric) by answer-list ranking or greedy generation."""
    from aurora_jax.data.text import vqa_accuracy

    answer_ids, answer_mask = jnp.asarray(data.answer_ids), jnp.asarray(data.answer_mask)

    @jax.jit
    def predict(trainable, frozen, pixels, qids, qmask):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        qids = qids.at[:, 0].set(cfg.enc_token_id)
        states = fwd(Blip.encode_multimodal, qids, qmask, fwd(Blip.encode_image, pixels))
        if mode == "rank":
            return rank_answers(lambda *a: fwd(Blip.decode, *a), states, qmask, answer_ids, answer_mask, k)
        bos = jnp.full((qids.shape[0], 1), cfg.bos_token_id, jnp.int32)
        return greedy_decode(lambda t: fwd(Blip.decode, t, None, states, qmask), bos, max_len=10,
                             eos_id=cfg.sep_token_id, pad_id=cfg.pad_token_id)

    scores = []
    for b in data.eval_images:
        pred = np.asarray(predict(trainable, frozen, b["image"], b["question_ids"], b["question_mask"]))
        for qid, p, valid in zip(np.asarray(b["question_id"]).tolist(), pred, np.asarray(b["valid"])):
            if not valid:
                continue
            if mode == "rank":
                answer = data.answer_list[int(p)]
            else:
                answer = _decode_answer(data, p, cfg)
            scores.append(vqa_accuracy(answer, data.gt_answers[int(qid)]))
    return {"vqa_acc": 100.0 * float(np.mean(scores)), "num_questions": float(len(scores))}


def _decode_answer(data, tokens: np.ndarray, cfg: BlipConfig) -> str:
    """Generated ids after [DEC], up to [SEP] -> the answer text."""
    ids = [int(t) for t in tokens[1:]]
    if cfg.sep_token_id in ids:
        ids = ids[: ids.index(cfg.sep_token_id)]
    return data.tokenizer.decode(ids, skip_special_tokens=True).strip()


def evaluate_caption(
    model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable, frozen, data, *, batch: int
) -> dict[str, float]:
    """Test LM loss of the first reference caption of each image (teacher forcing)."""

    @jax.jit
    def loss(trainable, frozen, pixels, ids, mask):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        ids = ids.at[:, 0].set(cfg.bos_token_id)
        logits = fwd(Blip.decode, ids, mask, fwd(Blip.encode_image, pixels))
        return lm_loss(logits, lm_targets(ids, mask))

    pixels, order = _images(data)
    pixels = pixels[np.argsort(order)]
    first = np.array([t[0] for t in data.img2txt])
    losses = []
    for start in range(0, len(pixels), batch):
        sl = slice(start, start + batch)
        losses.append(float(loss(trainable, frozen, pixels[sl], data.eval_text_ids[first[sl]],
                                 data.eval_text_mask[first[sl]])))
    return {"caption_loss": float(np.mean(losses))}
