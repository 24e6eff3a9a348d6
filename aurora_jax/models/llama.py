"""LLaMA / LLaMA-2 in the Hugging Face layout, with mPLUG-Owl2's modality-adaptive option.

Pre-RMSNorm decoder blocks: x + attn(norm(x)), then x + mlp(norm(x)); rotary position embeddings in the
HF `rotate_half` layout (first half of each head paired with the second half), grouped-query attention,
SwiGLU MLP, final RMSNorm and an lm_head (untied, or tied to the token embedding).

Modality-adaptive (mPLUG-Owl2): k_proj, v_proj and both RMSNorms exist twice, `text` (modality 0) and
`image` (modality 1); each token uses the copy its modality indicator selects. The rest is shared.

Functional use: `Llama.embed` turns ids into embeddings (for splicing image tokens), `__call__` runs on
ids or `inputs_embeds` with explicit positions and a padding mask, and with a KV cache (`init_cache`)
it decodes incrementally. The cache has a fixed length and one write index shared by the batch; each
sequence carries its own positions, so left-padded prompts decode correctly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.config_base import ConfigBase
from aurora_jax.models import layers
from aurora_jax.models.stack import LAYERS, layer_name, layer_stack

Array = jax.Array
Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ConfigBase):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: as many as query heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE scaling as transformers 4.31 (mPLUG-Owl2's modeling_llama2.py): "linear" divides positions by the
    # factor; "dynamic" (NTK) raises the base once the sequence is longer than max_position_embeddings.
    rope_scaling: str = "default"
    rope_scaling_factor: float = 1.0
    max_position_embeddings: int = 2048
    tie_embeddings: bool = False
    modality_adaptive: bool = False  # mPLUG-Owl2's per-modality k/v projections and norms
    remat: bool = False
    scan: bool = False  # the blocks under nn.scan (models.stack): parameters and KV cache stacked on `layers`
    # None / "xla" / "cudnn": jax.nn.dot_product_attention's implementation; "flash": the Pallas TPU flash kernel
    # for training and prefill (`layers.flash_attention`, TPU only), XLA's path when decoding with a cache.
    attention_impl: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if self.rope_scaling != "default" and not self.rope_scaling_factor > 1.0:
            # The release's config check: a float factor > 1.
            raise ValueError(f"rope_scaling {self.rope_scaling!r} needs a factor > 1, got {self.rope_scaling_factor}")

    @classmethod
    def from_hf(cls, hf: Any, **overrides) -> LlamaConfig:
        """From a transformers `LlamaConfig` (or its config.json dict); refuses options not implemented."""
        c = hf if isinstance(hf, Mapping) else hf.to_dict()
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"only SiLU (SwiGLU) LLaMA MLPs are supported, got hidden_act={c['hidden_act']!r}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise ValueError(f"LLaMA with {flag}=True is not supported")
        kw = dict(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim"),
            rms_eps=c.get("rms_norm_eps", 1e-6),
            **rope_fields_from_hf(c),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------------------------- RoPE

ROPE_SCALINGS = ("default", "linear", "dynamic")
_ROPE_KEYS = {"type", "rope_type", "factor", "rope_theta"}


def rope_fields_from_hf(c: Mapping[str, Any]) -> dict[str, Any]:
    """rope_theta / rope_scaling / rope_scaling_factor from an HF config dict (4.x `rope_scaling`, 5.x
    `rope_parameters`); anything this model does not compute (yarn, llama3, extra keys) is refused."""
    rope = dict(c.get("rope_parameters") or {})
    rope.update(c.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_type={kind!r} is not supported (only {ROPE_SCALINGS})")
    extra = sorted(set(rope) - _ROPE_KEYS)
    if kind == "dynamic" and rope.get("original_max_position_embeddings") in (None, c.get("max_position_embeddings")):
        extra = [k for k in extra if k != "original_max_position_embeddings"]  # the same length: no change
    if extra:
        raise ValueError(f"RoPE setting(s) {extra} are not supported (rope config {rope})")
    out = {"rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), "rope_scaling": kind}
    if kind != "default":
        if "factor" not in rope:
            raise ValueError(f"RoPE scaling {kind!r} without a factor: {rope}")
        out["rope_scaling_factor"] = float(rope["factor"])
    return out


def rope_base(cfg: LlamaConfig, seq_len: Array | int) -> Array | float:
    """The RoPE base for a sequence of `seq_len` keys: dynamic NTK raises it past max_position_embeddings as
    base * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2)), transformers 4.31's formula."""
    if cfg.rope_scaling != "dynamic":
        return cfg.rope_theta
    d, f, m = cfg.head_dim, cfg.rope_scaling_factor, cfg.max_position_embeddings
    seq = jnp.asarray(seq_len, jnp.float32)
    grown = cfg.rope_theta * (f * seq / m - (f - 1)) ** (d / (d - 2))
    return jnp.where(seq > m, grown, cfg.rope_theta)


def rope_frequencies(cfg: LlamaConfig, seq_len: Array | int) -> Array:
    """(head_dim / 2,) float32 angle per position unit, with the config's scaling for `seq_len` keys."""
    if cfg.rope_scaling == "dynamic":
        base = rope_base(cfg, seq_len)
        exps = jnp.asarray(np.arange(0, cfg.head_dim, 2) / cfg.head_dim, jnp.float32)
        return 1.0 / base ** exps
    inv = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    return inv / cfg.rope_scaling_factor if cfg.rope_scaling == "linear" else inv


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/d) for i < d/2, rounded once to float32 (what a float32 reference computes)."""
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)


def rotate_half(x: Array) -> Array:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, positions: Array, theta: float | Array) -> Array:
    """Rotate (B, T, N, H) queries or keys by their (B, T) positions, in float32.

    `theta` is the base, or the (H/2,) frequencies themselves (`rope_frequencies`, for scaled RoPE).
    """
    if isinstance(theta, (int, float)):
        inv = jnp.asarray(rope_inv_freq(x.shape[-1], theta))
    else:
        inv = jnp.asarray(theta, jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, H)
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.cos(angles) + rotate_half(x32) * jnp.sin(angles)).astype(x.dtype)


def positions_from_mask(attention_mask: Array) -> Array:
    """Positions that skip left padding: the count of real tokens before each token (pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# --------------------------------------------------------------------------------------------- layers


class Multiway(nn.Module):
    """Two copies of a layer, `text` (modality 0) and `image` (modality 1), selected per token."""

    make: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: Array, modality: Array) -> Array:
        text = self.make(name="text")(x)
        image = self.make(name="image")(x)
        return jnp.where((modality == 1)[..., None], image, text)


def _maybe_multiway(
    cfg: LlamaConfig, make: Callable[..., nn.Module], name: str
) -> Callable[[Array, Array], Array]:
    """A layer called as f(x, modality): plain when not modality-adaptive (the indicator is ignored)."""
    if cfg.modality_adaptive:
        return Multiway(make, name=name)
    layer = make(name=name)
    return lambda x, modality: layer(x)


class LlamaAttention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array | None,
        modality: Array,
        kv_cache: Cache | None = None,
        cache_index: Array | None = None,
    ) -> tuple[Array, Cache | None]:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        n, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(features, axes):
            return lambda name: layers.dense(features, axes, name=name, use_bias=False, dtype=dt)

        q = proj(n * hd, ("embed", "heads"))("q_proj")(x)
        k = _maybe_multiway(cfg, proj(nkv * hd, ("embed", "kv")), "k_proj")(x, modality)
        v = _maybe_multiway(cfg, proj(nkv * hd, ("embed", "kv")), "v_proj")(x, modality)
        # Dynamic NTK sees the keys so far (the cache's slots before this chunk plus the chunk), as the
        # release's kv_seq_len; keys already cached keep the rotation they were written with, as there.
        seq_len = x.shape[1] if cache_index is None else cache_index + x.shape[1]
        freqs = rope_frequencies(cfg, seq_len)
        q = apply_rope(layers.split_heads(q, n), positions, freqs)
        k = apply_rope(layers.split_heads(k, nkv), positions, freqs)
        v = layers.split_heads(v, nkv)

        new_cache = None
        if kv_cache is not None:
            # Write this chunk at the shared index; attention then runs over the whole fixed-size cache.
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), start)
            new_cache = {"k": k, "v": v}
            k, v = k.astype(dt), v.astype(dt)

        if cfg.attention_impl == "flash" and kv_cache is None:
            # Causal self-attention without a cache: the mask's last row is the key padding (B, S).
            key_mask = None if mask is None else jnp.broadcast_to(mask[:, 0, -1], (q.shape[0], mask.shape[-1]))
            out = layers.flash_attention(q, k, v, key_mask, scale=1.0 / math.sqrt(hd))
        else:  # "flash" decodes with a KV cache through XLA's path: one query per step, nothing to save
            impl = None if cfg.attention_impl == "flash" else cfg.attention_impl
            out = layers.dot_product_attention(q, k, v, mask, scale=1.0 / math.sqrt(hd), implementation=impl)
        out = layers.dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", use_bias=False, dtype=dt)(
            layers.merge_heads(out)
        )
        return out, new_cache


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def proj(features, axes, name):
            return layers.dense(features, axes, name=name, use_bias=False, dtype=dt)

        gate = proj(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = proj(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return proj(cfg.hidden_size, ("mlp", "embed"), "down_proj")(jax.nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array | None,
        modality: Array,
        kv_cache: Cache | None = None,
        cache_index: Array | None = None,
    ) -> tuple[Array, Cache | None]:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)

        def norm(name):
            return _maybe_multiway(cfg, lambda name: layers.RMSNorm(cfg.rms_eps, dt, name=name), name)

        h = norm("input_norm")(x, modality)
        a, new_cache = LlamaAttention(cfg, name="attn")(h, positions, mask, modality, kv_cache, cache_index)
        x = x + a
        x = x + LlamaMLP(cfg, name="mlp")(norm("post_attn_norm")(x, modality))
        return x, new_cache


# ----------------------------------------------------------------------------------------------- model


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache: per-layer k/v (B, max_len, kv_heads, head_dim), slot validity, write index."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    if cfg.scan:
        stacked = (cfg.num_layers, *shape)
        per_layer = {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
    else:
        per_layer = {layer_name(i): {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                     for i in range(cfg.num_layers)}
    return {"index": jnp.zeros((), jnp.int32), "mask": jnp.zeros((batch, max_len), bool), "layers": per_layer}


class Llama(nn.Module):
    """LlamaForCausalLM. `__call__` returns logits, or (logits, new_cache) when a cache is passed."""

    cfg: LlamaConfig

    def setup(self):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        self.embed_tokens = layers.embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens", dtype=dt)
        # remat recomputes each block's activations in the backward pass (the LLM's memory bottleneck).
        block = nn.remat(LlamaBlock) if cfg.remat else LlamaBlock
        names = [LAYERS] if cfg.scan else [layer_name(i) for i in range(cfg.num_layers)]
        self.blocks = {name: block(cfg, name=name) for name in names}
        self.final_norm = layers.RMSNorm(cfg.rms_eps, dt, name="final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = layers.dense(
                cfg.vocab_size, ("embed", "vocab"), name="lm_head", use_bias=False, dtype=dt
            )

    def embed(self, input_ids: Array) -> Array:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: Array) -> Array:
        """Final-normed hidden states -> float32 logits."""
        out = self.embed_tokens.attend(hidden) if self.cfg.tie_embeddings else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def hidden_states(
        self,
        input_ids: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        modality: Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[Array, Cache | None]:
        """The final-normed hidden states (B, T, d) and the updated cache (None without one)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = (
            self.embed(input_ids)
            if inputs_embeds is None
            else inputs_embeds.astype(jnp.dtype(self.cfg.dtype))
        )
        b, t = x.shape[:2]
        if modality is None:
            modality = jnp.zeros((b, t), jnp.int32)

        if cache is None:
            index = None
            if positions is None:
                positions = (
                    positions_from_mask(attention_mask) if attention_mask is not None else jnp.arange(t)[None]
                )
            mask = layers.combine_masks(layers.padding_mask(attention_mask), layers.causal_mask(t, t))
        else:
            index = cache["index"]
            if positions is None:
                positions = jnp.broadcast_to(index + jnp.arange(t), (b, t))
            new_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
            slot_mask = jax.lax.dynamic_update_slice(cache["mask"], new_mask, (0, index))
            s = slot_mask.shape[1]
            # Causality is by cache slot; padded slots are masked out by slot_mask.
            mask = layers.combine_masks(layers.padding_mask(slot_mask), layers.causal_mask(t, s, index))
        positions = jnp.broadcast_to(positions, (b, t))

        cfg = self.cfg
        kv = None if cache is None else cache["layers"]
        if kv is not None and not cfg.scan:
            kv = [kv[layer_name(i)] for i in range(cfg.num_layers)]
        x, new_kv = layer_stack(self.blocks.__getitem__, cfg.num_layers, x,
                                lambda block, h, kv_i: block(h, positions, mask, modality, kv_i, index),
                                scan=cfg.scan, xs=kv)
        x = self.final_norm(x)
        if cache is None:
            return x, None
        if not cfg.scan:
            new_kv = {layer_name(i): c for i, c in enumerate(new_kv)}
        return x, {"index": index + t, "mask": slot_mask, "layers": new_kv}

    def __call__(
        self,
        input_ids: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        modality: Array | None = None,
        cache: Cache | None = None,
    ) -> Array | tuple[Array, Cache]:
        h, new_cache = self.hidden_states(
            input_ids,
            inputs_embeds=inputs_embeds,
            positions=positions,
            attention_mask=attention_mask,
            modality=modality,
            cache=cache,
        )
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)

    def last_logits(
        self,
        input_ids: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        modality: Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[Array, Cache | None]:
        """Logits (B, V) of the last position only (prompts are left-padded), and the updated cache."""
        h, new_cache = self.hidden_states(
            input_ids,
            inputs_embeds=inputs_embeds,
            positions=positions,
            attention_mask=attention_mask,
            modality=modality,
            cache=cache,
        )
        return self.logits(h[:, -1]), new_cache


def init_params(cfg: LlamaConfig, rng: Array, *, boxed: bool = False) -> dict:
    """Random parameters for `cfg` (plain nested dict unless boxed=True keeps the logical axes)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    variables = Llama(cfg).init(rng, ids, modality=jnp.zeros((1, 2), jnp.int32))
    return variables["params"] if boxed else layers.unbox(variables["params"])


def abstract_params(cfg: LlamaConfig, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the parameters without allocating them."""
    return jax.eval_shape(lambda r: init_params(cfg, r, boxed=boxed), jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class LlamaDecoder:
    """The `generate.DecodeModel` interface for a text-only (or embeds-fed) LLaMA.

    prefill inputs: `attention_mask` (B, T) and either `input_ids` or `inputs_embeds`; optionally
    `modality` (B, T).
    """

    cfg: LlamaConfig

    def init_cache(self, batch: int, max_len: int) -> Cache:
        return init_cache(self.cfg, batch, max_len)

    def prefill(self, params: dict, cache: Cache, inputs: Mapping[str, Array]) -> tuple[Array, Cache, Array]:
        mask = inputs["attention_mask"]
        logits, cache = Llama(self.cfg).apply(
            {"params": params},
            inputs.get("input_ids"),
            inputs_embeds=inputs.get("inputs_embeds"),
            positions=positions_from_mask(mask),
            attention_mask=mask,
            modality=inputs.get("modality"),
            cache=cache,
            method=Llama.last_logits,
        )
        return logits, cache, jnp.sum(mask.astype(jnp.int32), axis=-1)

    def step(self, params: dict, tokens: Array, positions: Array, cache: Cache) -> tuple[Array, Cache]:
        return Llama(self.cfg).apply(
            {"params": params},
            tokens[:, None],
            positions=positions[:, None],
            cache=cache,
            method=Llama.last_logits,
        )
