"""mPLUG-Owl (v1) and mPLUG-Owl2: ViT-L/14 -> visual abstractor -> visual tokens spliced into LLaMA.

Image placeholders in `input_ids` come in two forms, both accepted (also mixed):
  release (Owl2's `tokenizer_image_token`): ONE `IMAGE_TOKEN_INDEX` (-200) per image. The model expands it to
    the image's `num_queries + 1` (65) visual tokens, as the release's `prepare_inputs_labels_for_multimodal`
    does; the attention mask, the modality indicator and the labels (`IGNORE_INDEX` on visual positions)
    expand with it (`expand_placeholders`). Rows grow by 64 positions per image: the output has
    `T + 64 * image_slots` positions, the shorter rows padded on the right (or, for prompts, on the left).
  expanded (v1's release tokenizer, and the project's own batches): `EXPANDED_IMAGE_ID` (-1) repeated 65
    times per image, already at the final length.
Images pair with placeholders as the release pairs them: rows in order, each row's images in order, and a
row without any placeholder still consumes one image (the release's dummy image of a text-only sample).
So `pixels` must hold exactly sum over rows of max(images in the row, 1) images (none at all when `pixels`
is None). Anything else (a count that does not match, an expanded run that is not a multiple of 65 long, a
row that does not fit `image_slots`) raises a ValueError naming the row when the ids are concrete; under
`jax.jit` they cannot be inspected, so the offending rows' embeddings are set to NaN instead (loud: the
training NaN guard skips the step and counts it) -- never a silent misalignment.
Owl2 additionally feeds the LLM a modality indicator (1 on image tokens) for its modality-adaptive layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
        abstractor=AbstractorConfig(version=1, grid_size=16, attention_dropout=0.1),  # the release's v1 default
        llm=LlamaConfig(rms_eps=1e-6, **llm_overrides),
    )


def owl2_config(**llm_overrides) -> OwlConfig:
    """mPLUG-Owl2: 448 px ViT-L/14, abstractor v2, modality-adaptive LLaMA-2-7B."""
    kw = dict(rms_eps=1e-5, max_position_embeddings=4096, modality_adaptive=True)
    kw.update(llm_overrides)
    return OwlConfig(version=2, llm=LlamaConfig(**kw))


IMAGE_TOKEN_INDEX = -200  # the release's `<|image|>` id: one per image, expanded by the model
EXPANDED_IMAGE_ID = -1  # fills each of an image's visual-token positions in expanded ids (v1's release id)
IGNORE_INDEX = -100


class Expanded(NamedTuple):
    """`expand_placeholders`' result: everything at the expanded length, and what is wrong per row."""

    input_ids: Array  # (B, T') text ids; EXPANDED_IMAGE_ID on visual positions; 0 on added padding
    attention_mask: Array  # (B, T')
    labels: Array | None  # (B, T') IGNORE_INDEX on visual positions and added padding
    modality: Array  # (B, T') 1 on visual positions
    image: Array  # (B, T') index into the batch's images of each visual position (0 elsewhere)
    token: Array  # (B, T') which of the image's visual tokens
    images_used: Array  # () images the rows consume (compare with the number given)
    overflow: Array  # (B,) the row does not fit T'
    partial: Array  # (B,) an expanded run whose length is not a multiple of the tokens per image
    units: Array  # (B,) images in the row


@functools.partial(jax.jit, static_argnames=("tokens_per_image", "image_slots", "pad_side"))
def expand_placeholders(
    input_ids: Array,
    attention_mask: Array | None = None,
    labels: Array | None = None,
    *,
    tokens_per_image: int,
    image_slots: int = 0,
    pad_side: str = "right",
) -> Expanded:
    """Expand each IMAGE_TOKEN_INDEX to `tokens_per_image` positions (a gather, so it runs under jit).

    The output has T + (tokens_per_image - 1) * image_slots positions (static); rows that end up shorter are
    padded on `pad_side` ("left" keeps a left-padded prompt's last token last). Ids already in the expanded
    form pass through unchanged (with image_slots=0 the whole function is the identity on them).
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    ids = jnp.asarray(input_ids, jnp.int32)
    b, t = ids.shape
    k = tokens_per_image
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    single = ids == IMAGE_TOKEN_INDEX
    width = jnp.where(single, k, 1)
    end = jnp.cumsum(width, axis=1)
    start, length = end - width, end[:, -1]
    t_out = t + (k - 1) * image_slots
    offset = t_out - length if pad_side == "left" else jnp.zeros((b,), jnp.int32)
    # Mark where each source token starts; a running count then names the source of every output slot.
    rows = jnp.arange(b)[:, None]
    marks = jnp.zeros((b, t_out), jnp.int32).at[rows, start + offset[:, None]].add(1, mode="drop")
    src = jnp.clip(jnp.cumsum(marks, axis=1) - 1, 0, t - 1)
    j = jnp.arange(t_out)[None]
    valid = (j >= offset[:, None]) & (j < (offset + length)[:, None])
    take = lambda a: jnp.take_along_axis(a, src, axis=1)  # noqa: E731
    from_single = take(single) & valid
    src_ids = take(ids)
    out_ids = jnp.where(valid, jnp.where(from_single, EXPANDED_IMAGE_ID, src_ids), 0)
    is_image = valid & (out_ids < 0)
    out_mask = jnp.where(valid, take(mask), 0)
    out_labels = None
    if labels is not None:
        lab = take(jnp.asarray(labels, jnp.int32))
        out_labels = jnp.where(valid & ~is_image, lab, IGNORE_INDEX)

    # Image bookkeeping on the expanded layout: the c-th visual position of a row is token c % k of the
    # row's image c // k; a row consumes max(its images, 1) images (the release's text-only rows).
    count = jnp.cumsum(is_image, axis=1) - is_image  # visual positions before this one, in the row
    total = jnp.sum(is_image, axis=1)
    run_start = is_image & ~jnp.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    partial = (total % k != 0) | jnp.any(run_start & (count % k != 0), axis=1)
    units = total // k
    consumed = jnp.maximum(units, 1)
    base = jnp.cumsum(consumed) - consumed
    image = jnp.where(is_image, base[:, None] + count // k, 0)
    return Expanded(out_ids, out_mask, out_labels, is_image.astype(jnp.int32), image,
                    jnp.where(is_image, count % k, 0), jnp.sum(consumed), length > t_out, partial, units)


def placeholder_errors(x: Expanded, num_images: int, image_slots: int) -> Array:
    """(B,) rows whose placeholders are ambiguous: overflow, partial runs, or an image count that does not match."""
    if num_images == 0:
        return x.overflow | x.partial | (x.units > 0)
    return x.overflow | x.partial | (x.images_used != num_images)


def raise_placeholder_errors(x: Expanded, num_images: int, image_slots: int, tokens_per_image: int) -> None:
    """The ValueError for concrete ids whose placeholders are ambiguous (see `placeholder_errors`)."""
    over, part, units = (np.asarray(a) for a in (x.overflow, x.partial, x.units))
    k = tokens_per_image
    if over.any():
        raise ValueError(f"rows {np.flatnonzero(over).tolist()} hold more {IMAGE_TOKEN_INDEX} image placeholders "
                         f"than image_slots={image_slots} leaves room for")
    if part.any():
        raise ValueError(f"rows {np.flatnonzero(part).tolist()} hold a run of {EXPANDED_IMAGE_ID} image positions "
                         f"whose length is not a multiple of {k} tokens per image (a cut or partial image)")
    if num_images == 0 and units.any():
        raise ValueError(f"rows {np.flatnonzero(units).tolist()} hold image placeholders but no pixels were given")
    used = int(x.images_used)
    if num_images and used != num_images:
        raise ValueError(f"the rows' placeholders take {used} images (per row {units.tolist()} images, a row "
                         f"without any still takes one, as the release does) but pixels holds {num_images}")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def default_image_slots(input_ids: Any) -> int:
    """Room for the most IMAGE_TOKEN_INDEX placeholders of a row (concrete ids); 0 under jit (pass it there)."""
    if not _is_concrete(input_ids):
        return 0
    return int(np.max(np.sum(np.asarray(input_ids) == IMAGE_TOKEN_INDEX, axis=1), initial=0))


def splice_images(text_embeds: Array, image: Array, token: Array, is_image: Array, visual: Array) -> Array:
    """Put visual[image, token] at the image positions of (B, T, D) embeddings; visual is (N, K, D)."""
    n = visual.shape[0]
    picked = visual.astype(text_embeds.dtype)[jnp.clip(image, 0, n - 1), token]
    return jnp.where(is_image[..., None] > 0, picked, text_embeds)


class Owl(nn.Module):
    """mPLUG-Owl / Owl2. `__call__` returns logits, or (logits, new_cache) when a cache is passed.

    The logits cover the expanded sequence (see the module docstring); `image_slots` (static) is the room for
    release-style placeholders per row: None = exactly enough for concrete ids, 0 under jit.
    """

    cfg: OwlConfig

    def setup(self):
        self.vision = VisionTransformer(self.cfg.vision)
        self.abstractor = Abstractor(self.cfg.abstractor)
        self.llm = Llama(self.cfg.llm)

    def encode_images(self, pixels: Array, deterministic: bool = True) -> Array:
        """(N, H, W, 3) pixels -> (N, 65, llm width) visual tokens."""
        return self.abstractor(self.vision(pixels), deterministic=deterministic)

    def expand(self, input_ids: Array, attention_mask: Array | None, pixels: Array | None,
               image_slots: int | None, pad_side: str = "right") -> tuple[Expanded, Array]:
        """The expanded inputs and the (B,) rows with ambiguous placeholders (ValueError when concrete)."""
        slots = default_image_slots(input_ids) if image_slots is None else image_slots
        n = 0 if pixels is None else pixels.shape[0]
        x = expand_placeholders(input_ids, attention_mask, tokens_per_image=self.cfg.tokens_per_image,
                                image_slots=slots, pad_side=pad_side)
        bad = placeholder_errors(x, n, slots)
        if _is_concrete(bad) and bool(np.any(np.asarray(bad))):
            raise_placeholder_errors(x, n, slots, self.cfg.tokens_per_image)
        return x, bad

    def embed_inputs(self, x: Expanded, bad: Array, pixels: Array | None, deterministic: bool = True) -> Array:
        """LLM input embeddings with the images spliced in; NaN rows where placeholders are ambiguous (jit)."""
        embeds = self.llm.embed(jnp.where(x.input_ids < 0, 0, x.input_ids))
        if pixels is not None:
            visual = self.encode_images(pixels, deterministic)
            embeds = splice_images(embeds, x.image, x.token, x.modality, visual)
        return jnp.where(bad[:, None, None], jnp.nan, embeds)

    def _hidden(self, input_ids, pixels, attention_mask, positions, cache, image_slots, pad_side, deterministic):
        x, bad = self.expand(input_ids, attention_mask, pixels, image_slots, pad_side)
        embeds = self.embed_inputs(x, bad, pixels, deterministic)
        if positions is not None and embeds.shape[1] != input_ids.shape[1]:
            raise ValueError("explicit positions cannot follow an expansion of image placeholders: pass none")
        mask = x.attention_mask if attention_mask is not None or embeds.shape[1] != input_ids.shape[1] else None
        if cache is not None and positions is None:
            positions = positions_from_mask(x.attention_mask)
        return self.llm.hidden_states(
            inputs_embeds=embeds,
            positions=positions,
            attention_mask=mask,
            modality=x.modality if self.cfg.version == 2 else None,
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
        image_slots: int | None = None,
        deterministic: bool = True,
    ) -> Array | tuple[Array, Cache]:
        h, new_cache = self._hidden(input_ids, pixels, attention_mask, positions, cache, image_slots, "right",
                                    deterministic)
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
        image_slots: int | None = None,
    ) -> tuple[Array, Cache | None]:
        """Logits (B, V) of the last position (left-padded prompts, expanded left-padded) and the updated cache."""
        h, new_cache = self._hidden(input_ids, pixels, attention_mask, positions, cache, image_slots, "left", True)
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
    ids = jnp.asarray([[IMAGE_TOKEN_INDEX, 1, 1]], jnp.int32)
    variables = Owl(cfg).init(rng, ids, jnp.zeros((1, s, s, 3), jnp.float32), image_slots=1)
    return variables["params"] if boxed else layers.unbox(variables["params"])


def abstract_params(cfg: OwlConfig, *, boxed: bool = False) -> dict:
    """Shapes and dtypes of the parameters without allocating them."""
    return jax.eval_shape(lambda r: init_params(cfg, r, boxed=boxed), jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class OwlDecoder:
    """The `generate.DecodeModel` interface for Owl.

    prefill inputs: `input_ids` (B, T) left-padded, `attention_mask` (B, T), and `pixels` (N, H, W, 3)
    (optional for text-only prompts). `image_slots` (static): room per row for release-style (-200)
    placeholders, expanded inside the prefill; 0 for prompts already in the expanded form.
    """

    cfg: OwlConfig
    image_slots: int = 0

    @property
    def _extra(self) -> int:
        return (self.cfg.tokens_per_image - 1) * self.image_slots

    def init_cache(self, batch: int, max_len: int) -> Cache:
        return init_cache(self.cfg.llm, batch, max_len + self._extra)

    def prefill(self, params: dict, cache: Cache, inputs: Mapping[str, Array]) -> tuple[Array, Cache, Array]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        logits, cache = Owl(self.cfg).apply(
            {"params": params}, ids, inputs.get("pixels"), mask, cache=cache, image_slots=self.image_slots,
            method=Owl.last_logits,
        )
        grown = (self.cfg.tokens_per_image - 1) * jnp.sum(ids == IMAGE_TOKEN_INDEX, axis=-1)
        return logits, cache, jnp.sum(mask.astype(jnp.int32), axis=-1) + grown

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
                                  num_queries=num_queries, output_size=width, grid_size=grid,
                                  attention_dropout=0.1 if version == 1 else 0.0)  # the releases' defaults
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
