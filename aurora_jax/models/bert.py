"""BLIP's BERT "MED" text model: one set of weights, three modes.

- unimodal text encoder: bidirectional self-attention only (ITC text features);
- multimodal encoder: bidirectional self-attention + cross-attention to image tokens in every layer (ITM,
  VQA question encoding);
- causal decoder: causal self-attention + cross-attention, with an LM head (captions, VQA answers).
Post-LN BERT blocks: LN(x + dense(attn)), LN(x + dense(act(dense(x)))).

Video (Aurora's release, WillDreamer/Aurora CP/med.py): cross-attention to the concatenated tokens of T frames can be
"frame-aware": given text-to-frame similarities (B, T), every cross-attention key except each frame's first token
([CLS]) is scaled by that frame's weight T * softmax_T(sim / 4), a constant for the gradient.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from aurora_jax.config_base import ConfigBase
from aurora_jax.models import layers
from aurora_jax.models.stack import layer_stack

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertConfig(ConfigBase):
    vocab_size: int = 30524
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    eps: float = 1e-12
    encoder_width: int = 768  # width of the image (or question) tokens cross-attended to
    act: str = "gelu"
    dropout: float = 0.0  # hidden dropout (HF's hidden_dropout_prob): embeddings and both residual branches
    attention_dropout: float = 0.0  # on the attention probabilities (HF's attention_probs_dropout_prob)
    cross_attention: bool = True
    pad_token_id: int = 0
    remat: bool = False
    scan: bool = False  # the layers under nn.scan (models.stack): parameters stacked on a leading `layers` axis
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        layers.activation(self.act)


FRAME_SIM_SCALE = 4.0  # the release divides the text-to-frame similarity by 4 before the softmax over frames


def frame_weights(frame_sim: Array) -> Array:
    """Text-to-frame similarities (B, T) -> key weights T * softmax over frames of sim / 4, without gradient."""
    sim = jax.lax.stop_gradient(frame_sim).astype(jnp.float32)
    return jax.nn.softmax(sim / FRAME_SIM_SCALE, axis=-1) * sim.shape[-1]


def frame_aware_keys(k: Array, weights: Array) -> Array:
    """Keys (B, T*N, d) of T concatenated frames: tokens 1..N-1 of frame t scaled by weights[:, t]; [CLS] kept.

    The weight is per token (all heads alike), so scaling before the head split equals the release's
    (B, heads, T, N, dh) reshape.
    """
    b, length, d = k.shape
    frames = weights.shape[-1]
    if weights.shape != (b, frames) or length % frames:
        raise ValueError(f"frame-aware attention: {length} key tokens cannot be split into the {frames} frames of "
                         f"weights {weights.shape} for a batch of {b}")
    n = length // frames
    scale = jnp.where(jnp.arange(n) == 0, 1.0, weights[:, :, None])  # (B, T, N): each frame's [CLS] unscaled
    return (k.reshape(b, frames, n, d) * scale[..., None].astype(k.dtype)).reshape(b, length, d)


class BertAttentionBlock(nn.Module):
    """Self- or cross-attention with its output dense and residual LayerNorm: LN(x + W_o attn(x, kv))."""

    cfg: BertConfig
    kv_width: int

    @nn.compact
    def __call__(self, x: Array, kv: Array, mask: Array | None, deterministic: bool = True,
                 frame_weight: Array | None = None) -> Array:
        """`frame_weight` (B, T) (`frame_weights`): frame-aware keys, applied after the key Dense (and any
        adapter delta on it, which the PEFT interceptor adds to the Dense's output), as the release does."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        d = cfg.hidden_size
        q = layers.dense(d, ("embed", "heads"), name="query", dtype=dt)(x)
        k = layers.dense(d, ("embed", "heads"), name="key", dtype=dt)(kv)
        v = layers.dense(d, ("embed", "heads"), name="value", dtype=dt)(kv)
        if frame_weight is not None:
            k = frame_aware_keys(k, frame_weight)
        split = lambda t: layers.split_heads(t, cfg.num_heads)  # noqa: E731
        a = layers.merge_heads(layers.attention(self, split(q), split(k), split(v), mask, rate=cfg.attention_dropout,
                                                deterministic=deterministic))
        a = layers.dense(d, ("heads", "embed"), name="out", dtype=dt)(a)
        a = nn.Dropout(cfg.dropout)(a, deterministic=deterministic)
        return layers.layer_norm(cfg.eps, name="out_norm", dtype=dt)(a + x)


class BertFFN(nn.Module):
    """LN(x + W_2 act(W_1 x))."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        h = layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="intermediate", dtype=dt)(x)
        h = layers.dense(cfg.hidden_size, ("mlp", "embed"), name="output", dtype=dt)(layers.activation(cfg.act)(h))
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return layers.layer_norm(cfg.eps, name="norm", dtype=dt)(h + x)


class BertLayer(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        self_mask: Array | None,
        encoder_states: Array | None,
        encoder_mask: Array | None,
        deterministic: bool = True,
        frame_weight: Array | None = None,
    ) -> Array:
        cfg = self.cfg
        h = BertAttentionBlock(cfg, cfg.hidden_size, name="self_attn")(x, x, self_mask, deterministic)
        if encoder_states is not None:
            if not cfg.cross_attention:
                raise ValueError("this text model was built without cross-attention layers")
            h = BertAttentionBlock(cfg, cfg.encoder_width, name="cross_attn")(
                h, encoder_states, encoder_mask, deterministic, frame_weight
            )
        elif cfg.cross_attention and self.is_initializing():
            # Create the cross-attention weights even when init runs in text-only mode.
            BertAttentionBlock(cfg, cfg.encoder_width, name="cross_attn")(
                h, jnp.zeros((*h.shape[:-1], cfg.encoder_width), h.dtype), None, deterministic
            )
        return BertFFN(cfg, name="ffn")(h, deterministic)


class BertEmbeddings(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array, deterministic: bool = True) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = layers.embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings", dtype=dt)(input_ids)
        x = x + layers.embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings", dtype=dt)(
            positions
        )
        x = layers.layer_norm(cfg.eps, name="norm", dtype=dt)(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


class BertMED(nn.Module):
    """The MED text model. `causal=True` is decoder mode; `encoder_states` switches on cross-attention."""

    cfg: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        encoder_states: Array | None = None,
        encoder_mask: Array | None = None,
        *,
        causal: bool = False,
        deterministic: bool = True,
        frame_sim: Array | None = None,
    ) -> Array:
        """`frame_sim` (B, T): text-to-frame similarities of a video batch whose `encoder_states` are T
        concatenated frames; switches on frame-aware cross-attention in every layer (None: off)."""
        cfg = self.cfg
        if frame_sim is not None and encoder_states is None:
            raise ValueError("frame_sim needs encoder_states (frame-aware attention acts in cross-attention)")
        t = input_ids.shape[-1]
        positions = jnp.arange(t)[None, :]
        x = BertEmbeddings(cfg, name="embeddings")(input_ids, positions, deterministic)
        self_mask = layers.padding_mask(attention_mask)
        if causal:
            self_mask = layers.combine_masks(self_mask, layers.causal_mask(t, t))
        cross_mask = None
        if encoder_states is not None and encoder_mask is not None:
            cross_mask = layers.padding_mask(encoder_mask)
        layer_cls = nn.remat(BertLayer, static_argnums=(5,)) if cfg.remat else BertLayer
        weight = None if frame_sim is None else frame_weights(frame_sim)
        x, _ = layer_stack(
            lambda name: layer_cls(cfg, name=name), cfg.num_layers, x,
            lambda layer, h, _: (layer(h, self_mask, encoder_states, cross_mask, deterministic, weight), None),
            scan=cfg.scan,
        )
        return x


class BertLMHead(nn.Module):
    """BERT's prediction head: LN(act(dense(h))) @ W_vocab + b."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        h = layers.dense(cfg.hidden_size, ("embed", "embed_out"), name="transform", dtype=dt)(h)
        h = layers.layer_norm(cfg.eps, name="transform_norm", dtype=dt)(layers.activation(cfg.act)(h))
        return layers.dense(cfg.vocab_size, ("embed", "vocab"), name="decoder", dtype=dt)(h)


class BertLMHeadModel(nn.Module):
    """Causal MED decoder + LM head: token ids -> next-token logits (B, T, vocab)."""

    cfg: BertConfig

    def setup(self):
        self.bert = BertMED(self.cfg)
        self.lm_head = BertLMHead(self.cfg)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None,
        encoder_states: Array,
        encoder_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        h = self.bert(input_ids, attention_mask, encoder_states, encoder_mask, causal=True,
                      deterministic=deterministic)
        return self.lm_head(h)
