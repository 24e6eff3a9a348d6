"""An independent PyTorch (float64) restatement of the release's video path (WillDreamer/Aurora CP/med.py,
CP/blip_retrieval.py), from its description: frame-aware cross-attention in the release's per-head layout
(keys (B, heads, T, N, dh), tokens 1: of every frame times T * softmax_T(sim / 4)), the video ITC and the
ITM pairs with their frame weights. Reuses tests/peft/torch_reference.py (ViT, Aurora deltas, linear / norm).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tests.peft import torch_reference as ref
from tests.peft.torch_reference import RefAurora, lin, ln, t


def frame_semantic(sim: torch.Tensor) -> torch.Tensor:
    """(B, T) similarities -> (B, 1, T, 1, 1) key multipliers, as the release computes them under no_grad."""
    with torch.no_grad():
        b, frames = sim.shape
        return torch.softmax(sim.reshape(b, 1, frames, 1, 1) / 4.0, dim=-3) * frames


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).permute(0, 2, 1, 3)


def _attn(p, P, aurora: RefAurora | None, x, kv, mask, cfg, sim=None):
    """One BERT attention block; with `sim`, the keys are scaled per frame after the Aurora delta."""
    q, k, v = lin(p["query"], x), lin(p["key"], kv), lin(p["value"], kv)
    if aurora:
        q = q + aurora.bert(x, P["query"])
        k = k + aurora.bert(kv, P["key"])
        v = v + aurora.bert(kv, P["value"])
    q, k, v = (_heads(z, cfg.num_heads) for z in (q, k, v))
    if sim is not None:
        a, h, n, dh = k.shape
        frames = sim.shape[1]
        k = k.reshape(a, h, frames, n // frames, dh).clone()
        k[:, :, :, 1:, :] = k[:, :, :, 1:, :] * frame_semantic(sim)
        k = k.reshape(a, h, n, dh)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    o = (s.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(x.shape)
    return ln(p["out_norm"], lin(p["out"], o) + x, cfg.eps)


def ref_bert(params, factors, gqt, aurora, ids, mask, cfg, enc=None, sim=None):
    """MED text encoder (bidirectional); cross-attention to `enc` in every layer, frame-aware with `sim`; GQT."""
    ids = torch.as_tensor(np.array(ids))
    emb = params["embeddings"]
    x = t(emb["word_embeddings"]["embedding"])[ids] + t(emb["position_embeddings"]["embedding"])[: ids.shape[1]]
    x = ln(emb["norm"], x, cfg.eps)
    self_mask = torch.as_tensor(mask).bool()[:, None, None, :]
    for i in range(cfg.num_layers):
        name = f"layer_{i}"
        lp, fp = params[name], (factors.get(name, {}) if aurora else {})
        h_s = _attn(lp["self_attn"], fp.get("self_attn"), aurora, x, x, self_mask, cfg)
        h = h_s
        if enc is not None:
            h = h_x = _attn(lp["cross_attn"], fp.get("cross_attn"), aurora, h_s, enc, None, cfg, sim)
        f = lp["ffn"]
        out = ln(f["norm"], lin(f["output"], F.gelu(lin(f["intermediate"], h))) + h, cfg.eps)
        if enc is not None and gqt is not None:
            g = {k: t(v) for k, v in gqt[name].items()}
            out = out + 0.1 * (g["a_s"] * h_s + g["b_s"]) + 0.1 * (g["a_x"] * h_x + g["b_x"])
        x = out
    return x


class RefVideoBlip:
    """The tuned BLIP retrieval model on clips, from the JAX param / adapter trees (weights only are shared)."""

    def __init__(self, params, adapter, cfg):
        self.p, self.cfg = params, cfg
        self.aurora = ref.from_jax_adapter(adapter)
        self.factors = adapter["factors"]
        self.gqt = adapter.get("gqt", {}).get("text_encoder")

    def frames(self, video) -> torch.Tensor:
        """(B, T, S, S, 3) -> (B, T, N, d): each frame through the tuned ViT."""
        b, frames = video.shape[:2]
        x = ref.ref_vit(self.p["visual_encoder"], self.factors["visual_encoder"], self.aurora,
                        video.reshape(b * frames, *video.shape[2:]), self.cfg.vision)
        return x.reshape(b, frames, *x.shape[1:])

    def text(self, ids, mask, enc=None, sim=None) -> torch.Tensor:
        return ref_bert(self.p["text_encoder"], self.factors["text_encoder"], self.gqt if enc is not None else None,
                        self.aurora, ids, mask, self.cfg.text, enc, sim)

    def proj(self, name, x) -> torch.Tensor:
        return F.normalize(lin(self.p[name], x), dim=-1)

    def itc(self, video, ids, mask, temp):
        """Clip features (vision_proj of the mean frame [CLS]), frame features, text features, ITC loss."""
        tokens = self.frames(video)
        clip = self.proj("vision_proj", tokens[:, :, 0, :].mean(dim=1))
        frame = self.proj("vision_proj", tokens[:, :, 0, :])
        text_cls = self.text(ids, mask)[:, 0]
        text = self.proj("text_proj", text_cls)
        sim = clip @ text.T / temp
        target = torch.eye(sim.shape[0], dtype=sim.dtype)  # distinct clips: the diagonal
        loss = (-(F.log_softmax(sim, 1) * target).sum(1).mean() - (F.log_softmax(sim.T, 1) * target).sum(1).mean()) / 2
        return tokens, clip, frame, text, text_cls, loss

    def itm_logits(self, tokens, frame, text, text_cls, ids, mask, neg_text, neg_video, enc_id, frame_aware=True):
        """The release's two ITM passes: positives (+ ICE), then [(text, neg clip); (neg text, clip)]."""
        ids = torch.as_tensor(ids).clone()
        ids[:, 0] = enc_id
        mask = torch.as_tensor(mask)
        b = ids.shape[0]
        flat = tokens.reshape(b, -1, tokens.shape[-1])
        sim_pos = torch.einsum("bc,btc->bt", text, frame) if frame_aware else None
        pos = self.text(ids, mask, flat, sim_pos)[:, 0] + 0.1 * text_cls.mean(0)
        frames_all = torch.cat([frame[neg_video], frame])
        text_all = torch.cat([text, text[neg_text]])
        sim_neg = torch.einsum("bc,btc->bt", text_all, frames_all) if frame_aware else None
        neg = self.text(torch.cat([ids, ids[neg_text]]), torch.cat([mask, mask[neg_text]]),
                        torch.cat([flat[neg_video], flat]), sim_neg)[:, 0]
        return lin(self.p["itm_head"], torch.cat([pos, neg]))
