"""Aurora in PyTorch, written from the method description (/work/shared/reference/aurora.md), in the release's
own layout (WillDreamer/Aurora CP/vit.py, CP/med.py): U, V as torch Linear weights (R x d, d x R), one R x k
factor per block, a dense R x R x R core (or its superdiagonal, strict CP).

It shares no code with `aurora_jax.peft` (only weights cross over) and is the ONE torch implementation used by
  * the parity tests (tests/peft/test_parity_torch.py through tests/peft/torch_reference.py): `RefAurora` and
    the functional `ref_vit` / `ref_bert` over JAX parameter trees, in float64, with fixed masks for dropout;
  * the benchmarks (bench/bench_blip.py train): `TorchAurora`, an nn.Module that adds the mode-approximation
    deltas and GQT to transformers' `BlipForImageTextRetrieval` through forward hooks (the HF modules and
    their parameter names stay as they are), and `torch_retrieval_loss` with ICE.

The four deltas (x: input of the adapted Linear; drop: dropout 0.1 on the rank-R bottleneck; M = C x_3 P):
  ViT q/k/v/proj  V(drop(U(x) @ M_m))                                (dropout after M)
  BERT q/k/v      V(drop(U(x)) @ M_0)                                (dropout before M)
  ViT fc1         reshape(V(reshape(drop(U(x) @ A), (..., 4, R))), (..., 4d)),  A = M[:, :, 0:4] as (R, 4R)
  ViT fc2         V(drop(reshape(U(reshape(h, (..., 4, d))), (..., 4R)) @ B^T)), B = M[:, :, 4:8] as (R, 4R)
GQT on each BERT layer with cross-attention: out + w (a_s h_s + b_s) + w (a_x h_x + b_x), w = 0.1.
ICE (retrieval loss): positive ITM [CLS] + 0.1 * batch mean of the unimodal text [CLS].
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DT = torch.float64
Drop = Callable[[torch.Tensor], torch.Tensor]


def _keep(z: torch.Tensor) -> torch.Tensor:
    return z


# ------------------------------------------------------------------------------------------ the deltas


def dense_core(core: torch.Tensor) -> torch.Tensor:
    """The R x R x R core; a length-R vector means the superdiagonal C[r, r, r] = core[r] (strict CP)."""
    if core.dim() == 3:
        return core
    r = core.shape[0]
    idx = torch.arange(r, device=core.device)
    dense = torch.zeros(r, r, r, dtype=core.dtype, device=core.device)
    dense[idx, idx, idx] = core
    return dense


def mode_product(C: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """M = C x_3 P: M[i, j, m] = sum_r C[i, j, r] P[r, m], shape (R, R, k)."""
    return torch.tensordot(dense_core(C), P, dims=([2], [0]))


def vit_delta(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, M: torch.Tensor, drop: Drop = _keep):
    """V(drop(U(x) @ M_m)) for every column m of M (R, R, k): (..., d) -> (..., k, d_out), one mask per m."""
    z = torch.einsum("...i,ijm->...mj", F.linear(x, U), M)
    return F.linear(drop(z), V)


def text_delta(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, M_m: torch.Tensor, drop: Drop = _keep):
    """BERT q/k/v: V(drop(U(x)) @ M_m), M_m (R, R)."""
    return F.linear(drop(F.linear(x, U)) @ M_m, V)


def fc1_delta(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, M4: torch.Tensor, drop: Drop = _keep):
    """ViT fc1 (d -> 4d), the release's literal row-major reshapes; M4 = M[:, :, 0:4]."""
    r = U.shape[0]
    z = drop(F.linear(x, U) @ M4.reshape(r, 4 * r))
    return F.linear(z.reshape(*x.shape[:-1], 4, r), V).reshape(*x.shape[:-1], 4 * V.shape[0])


def fc2_delta(h: torch.Tensor, U: torch.Tensor, V: torch.Tensor, M4: torch.Tensor, drop: Drop = _keep):
    """ViT fc2 (4d -> d), the release's literal row-major reshapes; M4 = M[:, :, 4:8]."""
    r, d = U.shape
    u = F.linear(h.reshape(*h.shape[:-1], 4, d), U).reshape(*h.shape[:-1], 4 * r)
    return F.linear(drop(u @ M4.reshape(r, 4 * r).T), V)


def gqt_term(h_s: torch.Tensor, h_x: torch.Tensor, g: dict[str, torch.Tensor], weight: float = 0.1):
    """The gated term GQT adds to a BERT layer's output: w (a_s h_s + b_s) + w (a_x h_x + b_x), no sigmoid."""
    return weight * (g["a_s"] * h_s + g["b_s"]) + weight * (g["a_x"] * h_x + g["b_x"])


# ------------------------------------------------------------------ float64 reference over JAX trees


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float64), dtype=DT)


def _mask(mask) -> Drop:
    return _keep if mask is None else (lambda z: z * mask)


class RefAurora:
    """Shared U (R x d), V (d x R), core C (R x R x R); `core` of length R means the superdiagonal.

    Masks given to the delta methods stand in for dropout at exactly the positions the spec names.
    """

    def __init__(self, U_w, V_w, core):
        self.U, self.V = t(U_w), t(V_w)
        self.C = dense_core(t(core))
        self.R = self.C.shape[0]

    def M(self, P) -> torch.Tensor:
        return mode_product(self.C, t(P))  # (R, R, k)

    def vit(self, x, P, m, mask=None):
        """V( drop( U(x) @ M_m ) )."""
        M = self.M(P)[:, :, m:m + 1]
        drop = _keep if mask is None else (lambda z: z * mask[..., None, :])
        return vit_delta(x, self.U, self.V, M, drop)[..., 0, :]

    def bert(self, x, P, mask=None):
        """V( drop( U(x) ) @ M_0 )."""
        return text_delta(x, self.U, self.V, self.M(P)[:, :, 0], _mask(mask))

    def fc1(self, x, P8, mask=None):
        return fc1_delta(x, self.U, self.V, self.M(P8)[:, :, 0:4], _mask(mask))

    def fc2(self, h, P8, mask=None):
        return fc2_delta(h, self.U, self.V, self.M(P8)[:, :, 4:8], _mask(mask))


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
            out = out + gqt_term(h_s, h_x, {k: t(v) for k, v in gqt[name].items()})
        x = out
    return x


def ref_lm_head(p, h, cfg):
    h = ln(p["transform_norm"], F.gelu(lin(p["transform"], h)), cfg.eps)
    return lin(p["decoder"], h)


# ------------------------------------------------------------- Aurora on transformers' BLIP (nn.Module)

# HF module name -> (delta kind, factor key, columns of the factor). Factor keys name the JAX factor path
# with "__" for "/" (ParameterDict keys cannot hold dots); the JAX tree and the HF model share layer numbers.
_HF_VIT = re.compile(
    r"^vision_model\.encoder\.layers\.(\d+)\.(self_attn\.qkv|self_attn\.projection|mlp\.fc1|mlp\.fc2)$")
_HF_TEXT = re.compile(r"^text_encoder\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)$")
_VIT_SITES = {"self_attn.qkv": ("vit_qkv", "attn", (0, 3)), "self_attn.projection": ("vit_proj", "attn", (3, 4)),
              "mlp.fc1": ("vit_fc1", "mlp", (0, 4)), "mlp.fc2": ("vit_fc2", "mlp", (4, 8))}
_TEXT_BLOCK = {"attention": "self_attn", "crossattention": "cross_attn"}
FACTOR_WIDTH = {"attn": 4, "mlp": 8}
GQT_NAMES = ("a_s", "b_s", "a_x", "b_x")
GQT_STD = 2e-4


def hf_sites(hf: nn.Module) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """Every Linear of an HF BLIP retrieval model that Aurora adapts: name -> (kind, factor key, columns)."""
    out = {}
    for name, mod in hf.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if m := _HF_VIT.match(name):
            kind, block, cols = _VIT_SITES[m.group(2)]
            out[name] = (kind, f"visual_encoder__layer_{m.group(1)}__{block}", cols)
        elif m := _HF_TEXT.match(name):
            key = f"text_encoder__layer_{m.group(1)}__{_TEXT_BLOCK[m.group(2)]}__{m.group(3)}"
            out[name] = ("text", key, (0, 1))
    return out


def hf_text_layers(hf: nn.Module) -> list[nn.Module]:
    return list(hf.text_encoder.encoder.layer)


class TorchAurora(nn.Module):
    """Aurora's trainable state for one HF `BlipForImageTextRetrieval`, applied to it by `attach`.

    Parameters: U (R, d), V (d, R), C (R, R, R) or (R,) for strict CP, one factor (R, k) per adapted block or
    Linear (`factors`, keys as `hf_sites`), and per BERT layer with cross-attention GQT's a_s, b_s, a_x, b_x.
    The deltas run in the adapter's dtype (float32 by default) and are cast to the Linear's output dtype, as
    the JAX side's type promotion does with float32 adapters on a bfloat16 model.
    """

    def __init__(self, hf: nn.Module, rank: int, *, dropout: float = 0.1, core: str = "dense", gqt: bool = True,
                 gqt_weight: float = 0.1, dtype: torch.dtype = torch.float32):
        super().__init__()
        if core not in ("dense", "diagonal"):
            raise ValueError(f"core={core!r}: 'dense' or 'diagonal'")
        self.sites = hf_sites(hf)
        if not self.sites:
            raise ValueError("no Linear of this model is an Aurora site (expected an HF BLIP retrieval model)")
        d = hf.config.vision_config.hidden_size
        if hf.config.text_config.hidden_size != d:
            raise ValueError("Aurora shares U and V: the ViT and BERT widths must be equal")
        dev = next(hf.parameters()).device
        kw = {"dtype": dtype, "device": dev}
        self.rank, self.dropout, self.gqt_weight = rank, dropout, gqt_weight
        self.U = nn.Parameter(torch.empty(rank, d, **kw))
        self.V = nn.Parameter(torch.empty(d, rank, **kw))
        self.C = nn.Parameter(torch.empty((rank, rank, rank) if core == "dense" else (rank,), **kw))
        widths = {}
        for kind, key, _ in self.sites.values():
            widths[key] = FACTOR_WIDTH[key.rsplit("__", 1)[1]] if kind.startswith("vit") else 1
        self.factors = nn.ParameterDict({k: nn.Parameter(torch.empty(rank, w, **kw))
                                         for k, w in sorted(widths.items())})
        n_layers = len(hf_text_layers(hf)) if gqt else 0
        self.gqt = nn.ParameterDict({f"text_encoder__layer_{i}__{n}": nn.Parameter(torch.empty(d, **kw))
                                     for i in range(n_layers) for n in GQT_NAMES})
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The release's initialisation: U ~ U(+-1/sqrt(d)), V = 0, C xavier (bound sqrt(3)/R) or ones (CP),
        P xavier (bound sqrt(6/(R+k))), GQT ~ N(0, 2e-4^2)."""
        d = self.U.shape[1]
        self.U.uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d))
        self.V.zero_()
        if self.C.dim() == 3:
            self.C.uniform_(-math.sqrt(3) / self.rank, math.sqrt(3) / self.rank)
        else:
            self.C.fill_(1.0)
        for P in self.factors.values():
            b = math.sqrt(6 / (self.rank + P.shape[1]))
            P.uniform_(-b, b)
        for g in self.gqt.values():
            g.normal_(0.0, GQT_STD)

    # -------------------------------------------------------------------------------- JAX interchange

    @torch.no_grad()
    def load_jax(self, adapter: dict) -> TorchAurora:
        """Copy a JAX Aurora adapter (`init_adapter` layout: U (d, R), V (R, d) kernels) into this module."""
        flat = _flatten(adapter)
        for name, value in self.jax_named_parameters():
            value.copy_(torch.from_numpy(np.array(_to_release(name, np.asarray(flat[name], np.float32)))))
        return self

    def jax_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(JAX adapter path joined by '/', parameter) for every parameter."""
        out = [("shared/U", self.U), ("shared/V", self.V), ("shared/C", self.C)]
        out += [("factors/" + k.replace("__", "/"), p) for k, p in self.factors.items()]
        out += [("gqt/" + k.replace("__", "/"), p) for k, p in self.gqt.items()]
        return out

    def grads_as_jax(self) -> dict[str, np.ndarray]:
        """The gradients in the JAX adapter's layout, keyed by '/'-joined path (U, V transposed back)."""
        return {n: _to_release(n, p.grad.detach().double().cpu().numpy()) for n, p in self.jax_named_parameters()}

    # ---------------------------------------------------------------------------------- the forward

    def _drop(self) -> Drop:
        if not self.training or self.dropout == 0.0:
            return _keep
        return lambda z: F.dropout(z, self.dropout, True)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The additive change of the adapted Linear `name`'s output for its input x."""
        kind, key, (lo, hi) = self.sites[name]
        M = mode_product(self.C, self.factors[key][:, lo:hi])
        x = x.to(self.U.dtype)
        drop = self._drop()
        if kind in ("vit_qkv", "vit_proj"):
            z = vit_delta(x, self.U, self.V, M, drop)
            return z.reshape(*z.shape[:-2], -1)
        if kind == "vit_fc1":
            return fc1_delta(x, self.U, self.V, M, drop)
        if kind == "vit_fc2":
            return fc2_delta(x, self.U, self.V, M, drop)
        return text_delta(x, self.U, self.V, M[:, :, 0], drop)

    def attach(self, hf: nn.Module) -> list[Any]:
        """Register forward hooks on `hf` that apply the deltas and GQT; returns the handles (`.remove()`)."""
        modules = dict(hf.named_modules())
        handles = []
        for name in self.sites:
            def add_delta(mod, args, out, name=name):
                return out + self.delta(name, args[0]).to(out.dtype)
            handles.append(modules[name].register_forward_hook(add_delta))
        if self.gqt:
            for i, layer in enumerate(hf_text_layers(hf)):
                handles += self._attach_gqt(i, layer)
        return handles

    def _attach_gqt(self, i: int, layer: nn.Module) -> list[Any]:
        """h_s / h_x recorded from the layer's self- and cross-attention blocks (outputs after their residual
        LayerNorm); the gated term is added to the FFN block's output only if cross-attention ran (multimodal)."""
        record: dict[str, torch.Tensor] = {}
        g = {n: self.gqt[f"text_encoder__layer_{i}__{n}"] for n in GQT_NAMES}

        def self_attn(mod, args, out):
            record.clear()  # a new call of this layer starts
            record["h_s"] = out[0] if isinstance(out, tuple) else out

        def cross_attn(mod, args, out):
            record["h_x"] = out[0] if isinstance(out, tuple) else out

        def ffn(mod, args, out):
            if "h_x" not in record:
                return out
            h_s, h_x = record.pop("h_s"), record.pop("h_x")
            term = gqt_term(h_s.to(self.U.dtype), h_x.to(self.U.dtype), g, self.gqt_weight)
            return out + term.to(out.dtype)

        return [layer.attention.register_forward_hook(self_attn),
                layer.crossattention.register_forward_hook(cross_attn),
                layer.output.register_forward_hook(ffn)]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _to_release(name: str, x: np.ndarray) -> np.ndarray:
    """JAX kernels (in, out) <-> torch Linear weights (out, in): U and V transpose, the rest is shared."""
    return x.T.copy() if name in ("shared/U", "shared/V") else x


# ------------------------------------------------------------------------------ the retrieval loss


TEMP_RANGE = (0.001, 0.5)  # the release clamps its ITC temperature to this before every forward


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(logits.log_softmax(dim=1) * targets).sum(dim=1).mean()


def hard_negative_weights(sim: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The release's fine-tuning rule: softmax(sim) with the positives zeroed (plain softmax, no +1e-4)."""
    return torch.softmax(sim.float(), dim=1).masked_fill(pos, 0.0)


def draw_negatives(sim: torch.Tensor, pos: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One negative per row, drawn by `hard_negative_weights` (torch.multinomial normalises them)."""
    return torch.multinomial(hard_negative_weights(sim, pos), 1, generator=gen).squeeze(1)


def torch_retrieval_loss(hf: nn.Module, b: dict[str, torch.Tensor], *, temp: float, enc_token_id: int,
                         gen: torch.Generator | None = None, ice_weight: float | None = 0.1,
                         negatives: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """BLIP's ITC + ITM with hard negatives (+ ICE on the positives) on the HF modules, with whatever
    hooks (`TorchAurora.attach`) are on them -> {loss, loss_itc, loss_itm}.

    `negatives` = (negative text per image, negative image per text) fixes the draw (parity tests);
    otherwise they are sampled with `gen`. Batch keys: image (B, 3, H, W), text_ids, text_mask, image_index.
    """
    temp = min(max(temp, TEMP_RANGE[0]), TEMP_RANGE[1])
    ids, mask = b["text_ids"], b["text_mask"]
    image = hf.vision_model(pixel_values=b["image"]).last_hidden_state
    text = hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    image_feat = F.normalize(hf.vision_proj(image[:, 0, :]), dim=-1)
    text_feat = F.normalize(hf.text_proj(text[:, 0, :]), dim=-1)
    sim = image_feat @ text_feat.t() / temp
    pos = b["image_index"][:, None] == b["image_index"][None, :]
    targets = pos.to(sim.dtype) / pos.sum(dim=1, keepdim=True)
    loss_itc = (_soft_ce(sim, targets) + _soft_ce(sim.t(), targets.t())) / 2
    enc_ids = ids.clone()
    enc_ids[:, 0] = enc_token_id
    if negatives is None:
        with torch.no_grad():
            negatives = (draw_negatives(sim, pos, gen), draw_negatives(sim.t(), pos.t(), gen))
    neg_text, neg_image = negatives

    def cls(i: torch.Tensor, m: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return hf.text_encoder(input_ids=i, attention_mask=m, encoder_hidden_states=img).last_hidden_state[:, 0]

    pos_cls = cls(enc_ids, mask, image)
    if ice_weight is not None:  # Informative Context Enhancement: positives only
        pos_cls = pos_cls + ice_weight * text[:, 0].mean(dim=0).to(pos_cls.dtype)
    states = torch.cat([pos_cls, cls(enc_ids, mask, image[neg_image]), cls(enc_ids[neg_text], mask[neg_text], image)])
    bsz = ids.shape[0]
    labels = torch.cat([torch.ones(bsz), torch.zeros(2 * bsz)]).long().to(ids.device)
    loss_itm = F.cross_entropy(hf.itm_head(states).float(), labels)
    return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm}


def trainable_parameters(hf: nn.Module, aurora: TorchAurora) -> list[nn.Parameter]:
    """Aurora's trainable set: the adapter (U, V, C, factors, GQT) + vision_proj + itm_head (the release's
    filter leaves text_proj frozen). Everything else in `hf` is frozen."""
    hf.requires_grad_(False)
    heads = [*hf.vision_proj.parameters(), *hf.itm_head.parameters()]
    for p in heads:
        p.requires_grad_(True)
    return [*aurora.parameters(), *heads]
