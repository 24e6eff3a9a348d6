"""BLIP task models: image-text retrieval (ITC + ITM), VQA (question encoder + answer decoder), captioning.

One `Blip` module whose parts depend on `cfg.task`; each stage is a method usable on its own through
`model.apply(params, ..., method=Blip.<stage>)`, so training, evaluation and PEFT code compose them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aurora_jax.config_base import ConfigBase
from aurora_jax.models import layers
from aurora_jax.models.bert import BertConfig, BertLMHeadModel, BertMED
from aurora_jax.models.vit import VisionTransformer, ViTConfig

Array = jax.Array
TASKS = ("retrieval", "vqa", "caption")


@dataclasses.dataclass(frozen=True)
class BlipConfig(ConfigBase):
    vision: ViTConfig = ViTConfig()
    text: BertConfig = BertConfig()
    task: str = "retrieval"
    embed_dim: int = 256  # ITC projection width
    temp: float = 0.07  # ITC temperature used when a checkpoint has none
    bos_token_id: int = 30522  # [DEC]
    enc_token_id: int = 30523  # [ENC]
    sep_token_id: int = 102
    pad_token_id: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.text.encoder_width != self.vision.hidden_size:
            raise ValueError(
                f"text.encoder_width ({self.text.encoder_width}) must equal vision.hidden_size "
                f"({self.vision.hidden_size})"
            )


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Blip(nn.Module):
    cfg: BlipConfig

    def setup(self):
        cfg = self.cfg
        self.visual_encoder = VisionTransformer(cfg.vision)
        if cfg.task in ("retrieval", "vqa"):
            self.text_encoder = BertMED(cfg.text)
        if cfg.task == "retrieval":
            self.vision_proj = layers.dense(cfg.embed_dim, ("embed", None), name="vision_proj")
            self.text_proj = layers.dense(cfg.embed_dim, ("embed", None), name="text_proj")
            self.itm_head = layers.dense(2, ("embed", None), name="itm_head")
            self.temp = self.param("temp", nn.with_logical_partitioning(
                nn.initializers.constant(cfg.temp), ()), ())
        if cfg.task in ("vqa", "caption"):
            self.text_decoder = BertLMHeadModel(dataclasses.replace(cfg.text, cross_attention=True))

    # -- stages ---------------------------------------------------------------------------------
    def encode_image(self, pixels: Array, deterministic: bool = True) -> Array:
        """(B, H, W, 3) -> image tokens (B, N, d_v); deterministic=False turns on stochastic depth."""
        return self.visual_encoder(pixels, deterministic)

    def encode_text(self, input_ids: Array, attention_mask: Array, deterministic: bool = True) -> Array:
        """Unimodal text encoder (no cross-attention) -> (B, T, d)."""
        return self.text_encoder(input_ids, attention_mask, deterministic=deterministic)

    def encode_multimodal(
        self,
        input_ids: Array,
        attention_mask: Array,
        image_embeds: Array,
        image_mask: Array | None = None,
        deterministic: bool = True,
        frame_sim: Array | None = None,
    ) -> Array:
        """Text encoder with cross-attention to image tokens (ITM / VQA question) -> (B, T, d).

        Video: `image_embeds` are the concatenated tokens of F frames (B, F*N, d); `frame_sim` (B, F), the
        text-to-frame ITC similarities, switches on the release's frame-aware cross-attention (models.bert).
        """
        return self.text_encoder(input_ids, attention_mask, image_embeds, image_mask, deterministic=deterministic,
                                 frame_sim=frame_sim)

    def image_feat(self, image_embeds: Array) -> Array:
        """Normalised ITC image feature from the [CLS] token."""
        return l2_normalize(self.vision_proj(image_embeds[:, 0, :]))

    def text_feat(self, text_embeds: Array) -> Array:
        """Normalised ITC text feature from the [CLS] token."""
        return l2_normalize(self.text_proj(text_embeds[:, 0, :]))

    def itm_logits(self, multimodal_cls: Array) -> Array:
        """ITM head on the multimodal [CLS] state -> (B, 2) logits (index 1 = match)."""
        return self.itm_head(multimodal_cls)

    def decode(
        self,
        input_ids: Array,
        attention_mask: Array | None,
        encoder_states: Array,
        encoder_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Causal decoder logits (B, T, vocab) conditioned on image (caption) or question (VQA) states."""
        return self.text_decoder(input_ids, attention_mask, encoder_states, encoder_mask, deterministic)

    # -- whole-model forward passes (also used for init) -----------------------------------------
    def itm(self, pixels: Array, input_ids: Array, attention_mask: Array) -> Array:
        image_embeds = self.encode_image(pixels)
        h = self.encode_multimodal(input_ids, attention_mask, image_embeds)
        return self.itm_logits(h[:, 0, :])

    def itc(self, pixels: Array, input_ids: Array, attention_mask: Array) -> Array:
        """Cosine similarity matrix (B_img, B_txt) of ITC features (not divided by temp)."""
        image_feat = self.image_feat(self.encode_image(pixels))
        text_feat = self.text_feat(self.encode_text(input_ids, attention_mask))
        return image_feat @ text_feat.T

    def vqa_logits(
        self, pixels: Array, question_ids: Array, question_mask: Array, answer_ids: Array, answer_mask: Array
    ) -> Array:
        image_embeds = self.encode_image(pixels)
        q = self.encode_multimodal(question_ids, question_mask, image_embeds)
        return self.decode(answer_ids, answer_mask, q, question_mask)

    def caption_logits(self, pixels: Array, input_ids: Array, attention_mask: Array) -> Array:
        return self.decode(input_ids, attention_mask, self.encode_image(pixels))

    def __call__(self, pixels: Array, input_ids: Array, attention_mask: Array) -> Any:
        """Touches every parameter of the task model (for init)."""
        if self.cfg.task == "retrieval":
            sim = self.itc(pixels, input_ids, attention_mask)
            return sim * self.temp, self.itm(pixels, input_ids, attention_mask)
        if self.cfg.task == "vqa":
            return self.vqa_logits(pixels, input_ids, attention_mask, input_ids, attention_mask)
        return self.caption_logits(pixels, input_ids, attention_mask)


def init_params(cfg: BlipConfig, rng: Array, *, boxed: bool = False) -> dict:
    """Random parameters for `cfg` (plain nested dict unless boxed=True keeps the logical axes)."""
    model = Blip(cfg)
    s = cfg.vision.image_size
    pixels = jnp.zeros((1, s, s, 3), jnp.float32)
    ids = jnp.zeros((1, 4), jnp.int32)
    variables = model.init(rng, pixels, ids, jnp.ones((1, 4), jnp.int32))
    return variables["params"] if boxed else layers.unbox(variables["params"])


def abstract_params(cfg: BlipConfig, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the parameters without allocating them."""
    return jax.eval_shape(lambda r: init_params(cfg, r, boxed=boxed), jax.random.key(0))


PRESETS = {
    # (hidden, layers, heads, mlp) for vision and text; "base" is BLIP-base.
    "tiny": (64, 2, 4, 256),  # Aurora's fc1/fc2 reshapes need mlp = 4 * hidden
    "small": (256, 4, 4, 1024),
    "base": (768, 12, 12, 3072),
}


def preset_config(
    size: str, *, task: str, vocab_size: int, image_size: int, patch_size: int | None = None, **token_ids
) -> BlipConfig:
    """A BLIP config of a named size, for random init and pre-training from scratch."""
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(PRESETS)}")
    d, n, h, m = PRESETS[size]
    patch = patch_size or (16 if size == "base" else 8)
    vision = ViTConfig(image_size=image_size, patch_size=patch, hidden_size=d, num_layers=n, num_heads=h,
                       mlp_dim=m)
    text = BertConfig(vocab_size=vocab_size, hidden_size=d, num_layers=n, num_heads=h, intermediate_size=m,
                      max_position_embeddings=512 if size == "base" else 64, encoder_width=d)
    return BlipConfig(vision=vision, text=text, task=task, embed_dim=256 if size == "base" else 32, **token_ids)


def with_dropout(cfg: BlipConfig, *, hidden: float, attention: float, drop_path: float) -> BlipConfig:
    """The same model with these training-time rates: BERT hidden and attention-probability dropout, ViT drop path."""
    return cfg.replace(vision=dataclasses.replace(cfg.vision, drop_path=drop_path),
                       text=dataclasses.replace(cfg.text, dropout=hidden, attention_dropout=attention))


def with_compute(cfg: BlipConfig, dtype: str, *, remat: bool = False) -> BlipConfig:
    """The same model computing in `dtype` (parameters keep their own dtype), optionally with remat."""
    return cfg.replace(vision=dataclasses.replace(cfg.vision, dtype=dtype, remat=remat),
                       text=dataclasses.replace(cfg.text, dtype=dtype, remat=remat))
