"""mPLUG-Owl (v1) and mPLUG-Owl2: ViT-L/14 -> visual abstractor -> visual tokens spliced into LLaMA.

Inputs are token ids in which every image already occupies `num_queries + 1` (65) consecutive negative
placeholder ids (see `aurora_jax.tasks.instruct`, which builds them from the prompt templates). The k-th
run of placeholders in the batch, in row-major order, takes the tokens of image k of `pixels`, so
samples may hold any number of images; extra images (padding for a static batch shape) are unused.
Owl2 additionally feeds the LLM a modality indicator (1 on image tokens) for its modality-adaptive layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from aurora_jax.config_base import ConfigBase
from aurora_jax.models import layers
from aurora_jax.models.abstractor import Abstractor, AbstractorConfig
from aurora_jax.models.llama import Cache, Llama, LlamaConfig, init_cache, positions_from_mask
from aurora_jax.models.vit import VisionTransformer, ViTConfig

Array = jax.Array


def owl_vit_config(image_size: int, **kw) -> ViTConfig:
    """mPLUG-Owl's CLIP ViT-L/14: patch conv without bias, pre-LN, QuickGELU, per-head fused qkv."""
    base = dict(
        image_size=image_size,
        patch_size=14,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        mlp_dim=4096,
        eps=1e-6,
        act="quick_gelu",
        patch_bias=False,
        pre_norm=True,
        qkv_layout="per_head",
    )
    base.update(kw)
    return ViTConfig(**base)


@dataclasses.dataclass(frozen=True)
class OwlConfig(ConfigBase):
    version: int = 2
    vision: ViTConfig = owl_vit_config(448)
    abstractor: AbstractorConfig = AbstractorConfig(version=2, grid_size=32)
    llm: LlamaConfig = LlamaConfig(rms_eps=1e-5, max_position_embeddings=4096, modality_adaptive=True)

    def __post_init__(self):
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version}")
        if self.abstractor.version != self.version:
            raise ValueError(f"abstractor.version {self.abstractor.version} != version {self.version}")
        if self.llm.modality_adaptive != (self.version == 2):
            raise ValueError("llm.modality_adaptive must be True exactly for mPLUG-Owl2")
        if self.abstractor.hidden_size != self.vision.hidden_size:
            raise ValueError(
                f"abstractor.hidden_size {self.abstractor.hidden_size} != "
                f"vision.hidden_size {self.vision.hidden_size}"
            )
        if self.abstractor.output_size != self.llm.hidden_size:
            raise ValueError(
                f"abstractor.output_size {self.abstractor.output_size} != "
                f"llm.hidden_size {self.llm.hidden_size}"
            )
        if self.version == 2 and self.abstractor.grid_size != self.vision.grid:
            raise ValueError(
                f"abstractor.grid_size {self.abstractor.grid_size} != ViT grid {self.vision.grid}"
            )

    @property
    def tokens_per_image(self) -> int:
        return self.abstractor.num_output_tokens


def owl_v1_config(**llm_overrides) -> OwlConfig:
    """mPLUG-Owl: 224 px ViT-L/14, abstractor v1, LLaMA-7B."""
    return OwlConfig(
        version=1,
        vision=owl_vit_config(224),
        abstractor=AbstractorConfig(version=1, grid_size=16),
        llm=LlamaConfig(rms_eps=1e-6, **llm_overrides),
    )


def owl2_config(**llm_overrides) -> OwlConfig:
    """mPLUG-Owl2: 448 px ViT-L/14, abstractor v2, modality-adaptive LLaMA-2-7B."""
    kw = dict(rms_eps=1e-5, max_position_embeddings=4096, modality_adaptive=True)
    kw.update(llm_overrides)
    return OwlConfig(version=2, llm=LlamaConfig(**kw))


def splice_images(text_embeds: Array, image_mask: Array, visual: Array) -> Array:
    """Replace the embeddings at image positions by the visual tokens, in order.

    text_embeds (B, T, D); image_mask (B, T) bool; visual (N, K, D). The j-th image position of the batch
    (row-major) takes visual token j of the flattened (N*K, D) tokens.
    """
    b, t, d = text_embeds.shape
    flat_visual = visual.reshape(-1, d).astype(text_embeds.dtype)
    flat_mask = image_mask.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat_mask.astype(jnp.int32)) - 1, 0, flat_visual.shape[0] - 1)
    return jnp.where(flat_mask[:, None], flat_visual[idx], text_embeds.reshape(-1, d)).reshape(b, t, d)


class Owl(nn.Module):
    """mPLUG-Owl / Owl2. `__call__` returns logits, or (logits, new_cache) when a cache is passed."""

    cfg: OwlConfig

    def setup(self):
        self.vision = VisionTransformer(self.cfg.vision)
        self.abstractor = Abstractor(self.cfg.abstractor)
        self.llm = Llama(self.cfg.llm)

    def encode_images(self, pixels: Array) -> Array:
        """(N, H, W, 3) pixels -> (N, 65, llm width) visual tokens."""
        return self.abstractor(self.vision(pixels))

    def embed_inputs(self, input_ids: Array, pixels: Array | None) -> tuple[Array, Array]:
        """LLM input embeddings with the images spliced in, and the modality indicator (1 = image)."""
        image_mask = input_ids < 0
        embeds = self.llm.embed(jnp.where(image_mask, 0, input_ids))
        if pixels is not None:
            embeds = splice_images(embeds, image_mask, self.encode_images(pixels))
        return embeds, image_mask.astype(jnp.int32)

    def _hidden(self, input_ids, pixels, attention_mask, positions, cache):
        embeds, modality = self.embed_inputs(input_ids, pixels)
        return self.llm.hidden_states(
            inputs_embeds=embeds,
            positions=positions,
            attention_mask=attention_mask,
            modality=modality if self.cfg.version == 2 else None,
            cache=cache,
        )

    def __call__(
        self,
        input_ids: Array,
        pixels: Array | None = None,
        attention_mask: Array | None = None,
        *,
        positions: Array | None = None,
        cache: Cache | None = None,
    ) -> Array | tuple[Array, Cache]:
        h, new_cache = self._hidden(input_ids, pixels, attention_mask, positions, cache)
        logits = self.llm.logits(h)
        return logits if cache is None else (logits, new_cache)

    def last_logits(
        self,
        input_ids: Array,
        pixels: Array | None = None,
        attention_mask: Array | None = None,
        *,
        positions: Array | None = None,
        cache: Cache | None = None,
    ) -> tuple[Array, Cache | None]:
        """Logits (B, V) of the last position (left-padded prompts) and the updated cache."""
        h, new_cache = self._hidden(input_ids, pixels, attention_mask, positions, cache)
        return self.llm.logits(h[:, -1]), new_cache

    def decode_step(self, tokens: Array, positions: Array, cache: Cache) -> tuple[Array, Cache]:
        """One generated (text) token per sequence (B,) at positions (B,): logits (B, V) and the cache.

        Runs the LLM as this module's `llm` child, so module paths (and an adapter keyed by them, see
        `peft.TunedDecoder`) are the same as in training.
        """
        return self.llm.last_logits(tokens[:, None], positions=positions[:, None], cache=cache)


def init_params(cfg: OwlConfig, rng: Array, *, boxed: bool = False) -> dict:
    """Random parameters for `cfg` (plain nested dict unless boxed=True keeps the logical axes)."""
    s = cfg.vision.image_size
    k = cfg.tokens_per_image
    ids = jnp.concatenate([jnp.full((1, k), -1, jnp.int32), jnp.ones((1, 2), jnp.int32)], axis=1)
    variables = Owl(cfg).init(rng, ids, jnp.zeros((1, s, s, 3), jnp.float32))
    return variables["params"] if boxed else layers.unbox(variables["params"])


def abstract_params(cfg: OwlConfig, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the parameters without allocating them."""
    return jax.eval_shape(lambda r: init_params(cfg, r, boxed=boxed), jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class OwlDecoder:
    """The `generate.DecodeModel` interface for Owl.

    prefill inputs: `input_ids` (B, T) left-padded with image placeholders, `attention_mask` (B, T), and
    `pixels` (N, H, W, 3) (optional for text-only prompts).
    """

    cfg: OwlConfig

    def init_cache(self, batch: int, max_len: int) -> Cache:
        return init_cache(self.cfg.llm, batch, max_len)

    def prefill(self, params: dict, cache: Cache, inputs: Mapping[str, Array]) -> tuple[Array, Cache, Array]:
        mask = inputs["attention_mask"]
        logits, cache = Owl(self.cfg).apply(
            {"params": params},
            inputs["input_ids"],
            inputs.get("pixels"),
            mask,
            positions=positions_from_mask(mask),
            cache=cache,
            method=Owl.last_logits,
        )
        return logits, cache, jnp.sum(mask.astype(jnp.int32), axis=-1)

    def step(self, params: dict, tokens: Array, positions: Array, cache: Cache) -> tuple[Array, Cache]:
        # Generated tokens are text (modality 0); the LLM runs under its 'llm' path as in training.
        return Owl(self.cfg).apply({"params": params}, tokens, positions, cache, method=Owl.decode_step)


def tiny_owl_config(vocab_size: int, *, version: int = 2, image_size: int = 32, patch_size: int = 8,
                    vision_width: int = 64, vision_layers: int = 2, abstractor_layers: int = 2, num_queries: int = 8,
                    width: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> OwlConfig:
    """A small random-init Owl (v1 or v2 layout) for demos and tests; `vocab_size` is the tokenizer's."""
    grid = image_size // patch_size
    vision_heads = max(1, vision_width // 16)
    vision = owl_vit_config(image_size, patch_size=patch_size, hidden_size=vision_width, num_layers=vision_layers,
                            num_heads=vision_heads, mlp_dim=4 * vision_width)
    abstractor = AbstractorConfig(version=version, hidden_size=vision_width, num_layers=abstractor_layers,
                                  num_heads=vision_heads, intermediate_size=2 * vision_width,
                                  num_queries=num_queries, output_size=width, grid_size=grid)
    llm = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, rms_eps=1e-6 if version == 1 else 1e-5,
                      max_position_embeddings=1024, modality_adaptive=version == 2)
    return OwlConfig(version=version, vision=vision, abstractor=abstractor, llm=llm)


def random_params(cfg: OwlConfig, seed: int) -> dict:
    """Random Owl params (LeCun kernels; see `layers.lecun_random_params`) without compiling the init."""
    return layers.lecun_random_params(abstract_params(cfg), seed)


def with_compute(cfg: OwlConfig, dtype: str, *, remat: bool = False, attention_impl: str = "") -> OwlConfig:
    """The same model computing in `dtype`, optionally with remat and a chosen LLM attention kernel."""
    return cfg.replace(
        vision=dataclasses.replace(cfg.vision, dtype=dtype, remat=remat),
        abstractor=dataclasses.replace(cfg.abstractor, dtype=dtype, remat=remat),
        llm=dataclasses.replace(cfg.llm, dtype=dtype, remat=remat, attention_impl=attention_impl or None),
    )
