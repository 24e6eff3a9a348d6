"""Small PyTorch references for mPLUG-Owl / Owl2, written from the releases' modelling code (X-PLUG/mPLUG-Owl
mPLUG-Owl/mplug_owl/modeling_mplug_owl.py; mPLUG-Owl2/mplug_owl2/model/visual_encoder.py, modeling_llama2.py).

Module attribute names follow the release's checkpoint keys, so `state_dict()` of these modules is a
checkpoint in the release's layout and the parity tests also exercise `aurora_jax.convert.owl`.
Float32 throughout; no dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------- ViT


class RefViTEmbeddings(nn.Module):
    def __init__(self, d, patch, image_size):
        super().__init__()
        n = (image_size // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch, bias=False)
        self.position_embedding = nn.Parameter(torch.randn(1, n, d))
        self.pre_layernorm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, pixels):  # (B, 3, H, W)
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding
        return self.pre_layernorm(x)


class RefViTAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(d, 3 * d)
        self.dense = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        # Output rows are grouped per head: (heads, [q, k, v], head_dim).
        qkv = self.query_key_value(x).view(b, t, self.heads, 3, hd)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, N, T, H)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        return self.dense(a.transpose(1, 2).reshape(b, t, d))


class RefViTMLP(nn.Module):
    def __init__(self, d, mlp):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class RefViTLayer(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d, eps=1e-6)
        self.self_attn = RefViTAttention(d, heads)
        self.post_attention_layernorm = nn.LayerNorm(d, eps=1e-6)
        self.mlp = RefViTMLP(d, mlp)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class RefEncoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class RefViT(nn.Module):
    """keys: embeddings.*, encoder.layers.N.*, post_layernorm.*"""

    def __init__(self, d=32, heads=2, mlp=64, layers=2, patch=4, image_size=16):
        super().__init__()
        self.embeddings = RefViTEmbeddings(d, patch, image_size)
        self.encoder = RefEncoder([RefViTLayer(d, heads, mlp) for _ in range(layers)])
        self.post_layernorm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, pixels):
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# --------------------------------------------------------------------------------------- abstractor


def ref_sincos_1d(dim, n):
    """(n, dim): position p, channel i < dim/2 -> sin(p / 10000^(i/(dim/2))), channel dim/2 + i -> cos."""
    out = torch.zeros(n, dim, dtype=torch.float64)
    half = dim // 2
    for p in range(n):
        for i in range(half):
            a = p / 10000 ** (i / half)
            out[p, i], out[p, half + i] = math.sin(a), math.cos(a)
    return out


def ref_sincos_2d(dim, grid):
    """Zero row for CLS, then patch (row r, column c) in row-major order: [1-D(c) | 1-D(r)]."""
    table = ref_sincos_1d(dim // 2, grid)
    rows = [torch.zeros(dim, dtype=torch.float64)]
    for r in range(grid):
        for c in range(grid):
            rows.append(torch.cat([table[c], table[r]]))
    return torch.stack(rows)


class RefAbstractorMLP(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, ffn), nn.Linear(ffn, d), nn.Linear(d, ffn)
        self.ffn_ln = nn.LayerNorm(ffn, eps=1e-6)

    def forward(self, x):
        return self.w2(self.ffn_ln(nn.functional.silu(self.w1(x)) * self.w3(x)))


class RefAbstractorMHA(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class RefAbstractorOutput(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.out_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = RefAbstractorMLP(d, ffn)


class RefCrossAttention(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.normk = nn.LayerNorm(d, eps=1e-5)
        self.attention = RefAbstractorMHA(d)
        self.output = RefAbstractorOutput(d, ffn)


class RefAbstractorLayer(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.crossattention = RefCrossAttention(d, ffn)

    def forward(self, q, x, heads, q_pos=None, k_pos=None, keep=None, rate=0.0):
        """keep (B, N, T, S): the dropout mask on the attention probabilities (nn.Dropout with its mask fixed)."""
        ca = self.crossattention
        qn, xn = ca.norm1(q), ca.normk(x)
        kv = torch.cat([qn, xn], dim=1)
        q_in, k_in = (qn, kv) if q_pos is None else (qn + q_pos, kv + torch.cat([q_pos, k_pos], dim=0))
        b, t, d = q_in.shape
        hd = d // heads
        split = lambda y: y.view(b, y.shape[1], heads, hd).transpose(1, 2)  # noqa: E731
        qh, kh, vh = (
            split(ca.attention.query(q_in)),
            split(ca.attention.key(k_in)),
            split(ca.attention.value(kv)),
        )
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        if keep is not None:
            probs = probs * keep / (1.0 - rate)
        a = probs @ vh
        out = qn + ca.output.out_proj(a.transpose(1, 2).reshape(b, t, d))
        return out + ca.output.mlp(ca.output.norm2(out))


class RefAbstractor(nn.Module):
    """keys: query_embeds, encoder.layers.N.crossattention.*, visual_fc.*, vit_eos"""

    def __init__(self, version, d=32, heads=2, ffn=48, layers=2, queries=4, out=24, grid=4, own_queries=True):
        super().__init__()
        self.version, self.heads, self.grid = version, heads, grid
        if own_queries:  # v1 keeps them outside, as the top-level `query_tokens`
            self.query_embeds = nn.Parameter(torch.randn(1, queries, d))
        self.encoder = RefEncoder([RefAbstractorLayer(d, ffn) for _ in range(layers)])
        self.visual_fc = nn.Linear(d, out)
        self.vit_eos = nn.Parameter(torch.randn(1, 1, out))

    def forward(self, x, queries=None, keeps=None, rate=0.0):
        b, _, d = x.shape
        q = (self.query_embeds if queries is None else queries).expand(b, -1, -1)
        q_pos = k_pos = None
        if self.version == 2:
            q_pos = ref_sincos_1d(d, q.shape[1]).float()
            k_pos = ref_sincos_2d(d, self.grid).float()
        for i, layer in enumerate(self.encoder.layers):
            q = layer(q, x, self.heads, q_pos, k_pos, None if keeps is None else keeps[i], rate)
        return torch.cat([self.visual_fc(q), self.vit_eos.expand(b, -1, -1)], dim=1)


# ------------------------------------------------------------------------------ modality-adaptive LLaMA


class RefRMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Multiway(nn.Module):
    """Two copies; each token goes through the copy of its modality (scatter by index, as the release)."""

    def __init__(self, make):
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])

    def forward(self, x, modality):
        outs = [m(x) for m in self.multiway]
        out = torch.empty_like(outs[0])
        for way in (0, 1):
            idx = modality == way
            out[idx] = outs[way][idx]
        return out


def rope(x, positions, theta):
    """x (B, N, T, H) rotated by positions (T,) in the rotate_half layout."""
    h = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, h, 2, dtype=torch.float64) / h)
    ang = positions.double()[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1).float()
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return x * ang.cos() + torch.cat([-x2, x1], dim=-1) * ang.sin()


class RefMWAttention(nn.Module):
    def __init__(self, d, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, hd = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = Multiway(lambda: nn.Linear(d, kv_heads * hd, bias=False))
        self.v_proj = Multiway(lambda: nn.Linear(d, kv_heads * hd, bias=False))
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, modality, theta):
        b, t, d = x.shape
        hd = d // self.heads
        q = self.q_proj(x).view(b, t, self.heads, hd).transpose(1, 2)
        k = self.k_proj(x, modality).view(b, t, self.kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x, modality).view(b, t, self.kv_heads, hd).transpose(1, 2)
        pos = torch.arange(t)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        a = torch.softmax(s, dim=-1) @ v
        return self.o_proj(a.transpose(1, 2).reshape(b, t, d))


class RefMLP(nn.Module):
    def __init__(self, d, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class RefMWLayer(nn.Module):
    def __init__(self, d, heads, kv_heads, ffn, eps):
        super().__init__()
        self.input_layernorm = Multiway(lambda: RefRMSNorm(d, eps))
        self.self_attn = RefMWAttention(d, heads, kv_heads)
        self.post_attention_layernorm = Multiway(lambda: RefRMSNorm(d, eps))
        self.mlp = RefMLP(d, ffn)

    def forward(self, x, modality, theta):
        x = x + self.self_attn(self.input_layernorm(x, modality), modality, theta)
        return x + self.mlp(self.post_attention_layernorm(x, modality))


class RefMWModel(nn.Module):
    """Owl2's `model.*` LLM part: embed_tokens, layers.N (multiway), norm."""

    def __init__(self, vocab, d, heads, kv_heads, ffn, layers, eps):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([RefMWLayer(d, heads, kv_heads, ffn, eps) for _ in range(layers)])
        self.norm = RefRMSNorm(d, eps)


class RefMWLlama(nn.Module):
    """keys: model.embed_tokens, model.layers.N.*.multiway.{0,1}, model.norm, lm_head."""

    def __init__(self, vocab=64, d=32, heads=4, kv_heads=2, ffn=48, layers=2, eps=1e-5, theta=10000.0):
        super().__init__()
        self.theta = theta
        self.model = RefMWModel(vocab, d, heads, kv_heads, ffn, layers, eps)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, embeds, modality):
        x = embeds
        for layer in self.model.layers:
            x = layer(x, modality, self.theta)
        return self.lm_head(self.model.norm(x))


# ------------------------------------------------------------------------------------------ full model


def ref_splice(text_embeds, input_ids, visual):
    """Replace each run of negative ids by the next image's tokens (python loops, one sample at a time)."""
    out = text_embeds.clone()
    k = visual.shape[1]
    img = 0
    for b in range(input_ids.shape[0]):
        t = 0
        while t < input_ids.shape[1]:
            if input_ids[b, t] < 0:
                assert bool((input_ids[b, t : t + k] < 0).all())
                out[b, t : t + k] = visual[img]
                img, t = img + 1, t + k
            else:
                t += 1
    return out


class RefOwl2Inner(nn.Module):
    def __init__(self, llm: RefMWLlama, vit: RefViT, abstractor: RefAbstractor):
        super().__init__()
        self.embed_tokens = llm.model.embed_tokens
        self.layers = llm.model.layers
        self.norm = llm.model.norm
        self.vision_model = vit
        self.visual_abstractor = abstractor


class RefOwl2(nn.Module):
    """keys: model.{embed_tokens, layers, norm, vision_model, visual_abstractor}.*, lm_head."""

    def __init__(self, llm: RefMWLlama, vit: RefViT, abstractor: RefAbstractor):
        super().__init__()
        self._llm = [llm]  # not registered: its tensors appear under model.* / lm_head
        self.model = RefOwl2Inner(llm, vit, abstractor)
        self.lm_head = llm.lm_head

    def forward(self, input_ids, pixels):
        visual = self.model.visual_abstractor(self.model.vision_model(pixels))
        text = self.model.embed_tokens(input_ids.clamp(min=0))
        embeds = ref_splice(text, input_ids, visual)
        return self._llm[0](embeds, (input_ids < 0).long())


class RefOwl1(nn.Module):
    """keys: vision_model.*, query_tokens, abstractor.*, language_model.* (transformers LlamaForCausalLM)."""

    def __init__(self, llm, vit: RefViT, abstractor: RefAbstractor, queries: int, d: int):
        super().__init__()
        self.vision_model = vit
        self.query_tokens = nn.Parameter(torch.randn(1, queries, d))
        self.abstractor = abstractor  # built with own_queries=False
        self.language_model = llm

    def forward(self, input_ids, pixels):
        visual = self.abstractor(self.vision_model(pixels), self.query_tokens)
        text = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        embeds = ref_splice(text, input_ids, visual)
        return self.language_model(inputs_embeds=embeds).logits


# ------------------------------------------------------------------- release-style ids (one -200 per image)

IMAGE_TOKEN_INDEX, IGNORE_INDEX = -200, -100


def ref_prepare_multimodal(embed, input_ids, attention_mask, labels, image_features):
    """mPLUG-Owl2's `prepare_inputs_labels_for_multimodal`, restated: per row, each -200 becomes the next image's
    tokens (modality 1, labels IGNORE); a row without one still uses up an image; rows are right-padded with
    zero embeddings, modality 0, IGNORE labels; the mask gets True for the added length in front (what the
    release does), then the row's own mask, then False."""
    embeds, mods, labs = [], [], []
    img = 0
    t_in = input_ids.shape[1]
    for b in range(input_ids.shape[0]):
        ids, lab = input_ids[b], labels[b]
        if not bool((ids == IMAGE_TOKEN_INDEX).any()):
            embeds.append(embed(ids))
            mods.append(torch.zeros(len(ids), dtype=torch.long))
            labs.append(lab)
            img += 1
            continue
        parts, mod, new_lab = [], [], []
        while bool((ids == IMAGE_TOKEN_INDEX).any()):
            s = int(torch.where(ids == IMAGE_TOKEN_INDEX)[0][0])
            feats = image_features[img]
            parts += [embed(ids[:s]), feats]
            mod += [torch.zeros(s, dtype=torch.long), torch.ones(len(feats), dtype=torch.long)]
            new_lab += [lab[:s], torch.full((len(feats),), IGNORE_INDEX, dtype=lab.dtype)]
            ids, lab, img = ids[s + 1 :], lab[s + 1 :], img + 1
        parts.append(embed(ids))
        mod.append(torch.zeros(len(ids), dtype=torch.long))
        new_lab.append(lab)
        embeds.append(torch.cat(parts))
        mods.append(torch.cat(mod))
        labs.append(torch.cat(new_lab))
    n = max(len(e) for e in embeds)
    out_e = torch.stack([torch.cat([e, e.new_zeros(n - len(e), e.shape[1])]) for e in embeds])
    out_m = torch.stack([torch.cat([m, m.new_zeros(n - len(m))]) for m in mods])
    out_l = torch.stack([torch.cat([lab, lab.new_full((n - len(lab),), IGNORE_INDEX)]) for lab in labs])
    out_mask = torch.stack([
        torch.cat([torch.ones(len(lab) - t_in, dtype=torch.long), attention_mask[b],
                   torch.zeros(n - len(lab), dtype=torch.long)])
        for b, lab in enumerate(labs)])
    return out_e, out_m, out_l, out_mask, img


def ref_release_forward(ref, input_ids, attention_mask, labels, pixels):
    """(logits, modality, labels, attention mask, images used) of RefOwl1 / RefOwl2 on release-style ids."""
    if isinstance(ref, RefOwl2):
        feats = ref.model.visual_abstractor(ref.model.vision_model(pixels))
        embed = ref.model.embed_tokens
    else:
        feats = ref.abstractor(ref.vision_model(pixels), ref.query_tokens)
        embed = ref.language_model.get_input_embeddings()
    e, m, lab, mask, used = ref_prepare_multimodal(lambda i: embed(i.clamp(min=0)), input_ids, attention_mask,
                                                   labels, feats)
    if isinstance(ref, RefOwl2):
        logits = ref._llm[0](e, m)
    else:
        logits = ref.language_model(inputs_embeds=e, attention_mask=mask).logits
    return logits, m, lab, mask, used
