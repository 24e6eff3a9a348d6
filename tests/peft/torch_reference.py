"""An independent PyTorch (float64) restatement of the release's equations (WillDreamer/Aurora CP/vit.py
and CP/med.py), in the release's own layout: U, V as torch Linear weights (R x d, d x R), one R x k factor per block.

It is deliberately written with torch idioms (F.linear, tensordot, explicit per-column loops) and shares
no code with aurora_jax.peft; only the weights are shared. Masks given to the delta functions stand in
for dropout at exactly the positions the spec names.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DT = torch.float64


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float64), dtype=DT)


class RefAurora:
    """Shared U (R x d), V (d x R), core C (R x R x R); `core` of length R means the superdiagonal."""

    def __init__(self, U_w, V_w, core):
        self.U, self.V = t(U_w), t(V_w)
        core = t(core)
        if core.dim() == 1:  # strict CP: C[r, r, r] = lambda_r, every other entry zero
            r = core.shape[0]
            dense = torch.zeros(r, r, r, dtype=DT)
            idx = torch.arange(r)
            dense[idx, idx, idx] = core
            core = dense
        self.C = core
        self.R = self.C.shape[0]

    def M(self, P) -> torch.Tensor:
        return torch.tensordot(self.C, t(P), dims=([2], [0]))  # (R, R, k)

    def vit(self, x, P, m, mask=None):
        """V( drop( U(x) @ M_m ) )."""
        z = F.linear(x, self.U) @ self.M(P)[:, :, m]
        return F.linear(z if mask is None else z * mask, self.V)

    def bert(self, x, P, mask=None):
        """V( drop( U(x) ) @ M_0 )."""
        u = F.linear(x, self.U)
        return F.linear((u if mask is None else u * mask) @ self.M(P)[:, :, 0], self.V)

    def fc1(self, x, P8, mask=None):
        A = self.M(P8)[:, :, 0:4].reshape(self.R, 4 * self.R)
        z = F.linear(x, self.U) @ A
        z = z if mask is None else z * mask
        z = z.reshape(*x.shape[:-1], 4, self.R)
        return F.linear(z, self.V).reshape(*x.shape[:-1], 4 * self.V.shape[0])

    def fc2(self, h, P8, mask=None):
        B = self.M(P8)[:, :, 4:8].reshape(self.R, 4 * self.R)
        d = self.U.shape[1]
        u = F.linear(h.reshape(*h.shape[:-1], 4, d), self.U).reshape(*h.shape[:-1], 4 * self.R)
        z = u @ B.T
        return F.linear(z if mask is None else z * mask, self.V)


def from_jax_adapter(adapter) -> RefAurora:
    """Our JAX layout stores U, V as (in, out) kernels: the release's weights are their transposes."""
    sh = adapter["shared"]
    return RefAurora(np.asarray(sh["U"]).T, np.asarray(sh["V"]).T, np.asarray(sh["C"]))


def lin(p, x):
    return F.linear(x, t(p["kernel"]).T, t(p["bias"]))


def ln(p, x, eps):
    return F.layer_norm(x, (x.shape[-1],), t(p["scale"]), t(p["bias"]), eps)


def attention(q, k, v, heads, mask=None):
    b, tq, d = q.shape
    hd = d // heads
    q, k, v = (z.reshape(b, -1, heads, hd).transpose(1, 2) for z in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, tq, d)


def ref_vit(params, factors, aurora: RefAurora | None, pixels, cfg):
    """BLIP ViT with Aurora deltas on qkv (q, k, v columns 0-2), proj (column 3), fc1/fc2 (columns 0-7)."""
    d = cfg.hidden_size
    x = t(pixels).permute(0, 3, 1, 2)
    w = t(params["patch_embed"]["kernel"]).permute(3, 2, 0, 1)  # HWIO -> OIHW
    x = F.conv2d(x, w, t(params["patch_embed"]["bias"]), stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([t(params["cls_token"]).expand(x.shape[0], 1, d), x], 1) + t(params["pos_embed"])
    for i in range(cfg.num_layers):
        lp = params[f"layer_{i}"]
        Pa = factors[f"layer_{i}"]["attn"] if aurora else None
        Pm = factors[f"layer_{i}"]["mlp"] if aurora else None
        h = ln(lp["norm1"], x, cfg.eps)
        qkv = lin(lp["attn"]["qkv"], h)
        if aurora:
            qkv = qkv + torch.cat([aurora.vit(h, Pa, m) for m in range(3)], -1)
        q, k, v = qkv.split(d, -1)
        a = attention(q, k, v, cfg.num_heads)
        o = lin(lp["attn"]["proj"], a)
        if aurora:
            o = o + aurora.vit(a, Pa, 3)
        x = x + o
        h = ln(lp["norm2"], x, cfg.eps)
        h1 = lin(lp["mlp"]["fc1"], h)
        if aurora:
            h1 = h1 + aurora.fc1(h, Pm)
        h1 = F.gelu(h1)
        h2 = lin(lp["mlp"]["fc2"], h1)
        if aurora:
            h2 = h2 + aurora.fc2(h1, Pm)
        x = x + h2
    return ln(params["final_norm"], x, cfg.eps)


def _bert_attn(p, P, aurora, x, kv, mask, cfg):
    q, k, v = lin(p["query"], x), lin(p["key"], kv), lin(p["value"], kv)
    if aurora:
        q = q + aurora.bert(x, P["query"])
        k = k + aurora.bert(kv, P["key"])
        v = v + aurora.bert(kv, P["value"])
    a = lin(p["out"], attention(q, k, v, cfg.num_heads, mask))
    return ln(p["out_norm"], a + x, cfg.eps)


def ref_bert(params, factors, gqt, aurora, ids, mask, cfg, enc=None, enc_mask=None, causal=False):
    """MED text model; GQT (gate 0.1) on each layer output when cross-attention runs."""
    ids = torch.as_tensor(np.array(ids))
    tlen = ids.shape[1]
    emb = params["embeddings"]
    x = t(emb["word_embeddings"]["embedding"])[ids] + t(emb["position_embeddings"]["embedding"])[:tlen]
    x = ln(emb["norm"], x, cfg.eps)
    self_mask = torch.as_tensor(np.array(mask)).bool()[:, None, None, :]
    if causal:
        self_mask = self_mask & torch.tril(torch.ones(tlen, tlen, dtype=torch.bool))
    cross_mask = None if enc_mask is None else torch.as_tensor(np.array(enc_mask)).bool()[:, None, None, :]
    for i in range(cfg.num_layers):
        lp, name = params[f"layer_{i}"], f"layer_{i}"
        fp = factors.get(name, {}) if aurora else {}
        h_s = _bert_attn(lp["self_attn"], fp.get("self_attn"), aurora, x, x, self_mask, cfg)
        h = h_s
        if enc is not None:
            h_x = _bert_attn(lp["cross_attn"], fp.get("cross_attn"), aurora, h_s, t(enc), cross_mask, cfg)
            h = h_x
        f = lp["ffn"]
        out = ln(f["norm"], lin(f["output"], F.gelu(lin(f["intermediate"], h))) + h, cfg.eps)
        if enc is not None and gqt is not None:
            g = {k: t(v) for k, v in gqt[name].items()}
            out = out + 0.1 * (g["a_s"] * h_s + g["b_s"]) + 0.1 * (g["a_x"] * h_x + g["b_x"])
        x = out
    return x


def ref_lm_head(p, h, cfg):
    h = ln(p["transform_norm"], F.gelu(lin(p["transform"], h)), cfg.eps)
    return lin(p["decoder"], h)
