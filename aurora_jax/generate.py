"""Batched autoregressive generation with a KV cache: greedy, temperature and top-p/top-k sampling.

Model-agnostic: anything implementing `DecodeModel` (an empty cache, a prefill over the left-padded
prompt, a one-token step) can be decoded, e.g. `llama.LlamaDecoder`, `owl.OwlDecoder`, later BLIP's text
decoder. Prefill and the `lax.while_loop` decode run under one `jax.jit`; the loop stops early once
every sequence has produced a stop token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


class DecodeModel(Protocol):
    """What `generate` needs from a model. Implementations must be hashable (frozen dataclasses)."""

    def init_cache(self, batch: int, max_len: int) -> Any:
        """An empty cache with room for max_len tokens per sequence."""

    def prefill(self, params: Any, cache: Any, inputs: Mapping[str, Array]) -> tuple[Array, Any, Array]:
        """Run the left-padded prompt: (last-position logits (B, V), cache, next positions (B,))."""

    def step(self, params: Any, tokens: Array, positions: Array, cache: Any) -> tuple[Array, Any]:
        """Feed one token per sequence (B,) at positions (B,): (logits (B, V), cache)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus sampling: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0: no top-k cut
    stop_tokens: tuple[int, ...] = ()  # any of these ends a sequence (it is kept in the output)
    pad_id: int = 0  # written after a sequence has stopped

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


# Named sampling settings. "owl_v1" is mPLUG-Owl's default GenerationConfig (mplug_owl/modeling_mplug_owl.py:
# do_sample=True, top_k=3, temperature and top_p at transformers' defaults of 1.0), whose max_length=512 counts
# the prompt too (PRESET_MAX_LENGTH).
SAMPLING_PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0, "top_p": 1.0, "top_k": 0},
    "owl_v1": {"temperature": 1.0, "top_p": 1.0, "top_k": 3},
}
PRESET_MAX_LENGTH: dict[str, int] = {"owl_v1": 512}


def sampling_preset(name: str, *, max_new_tokens: int = 32, prompt_length: int | None = None,
                    **fields: Any) -> SamplingConfig:
    """A named `SAMPLING_PRESETS` entry; with `prompt_length`, max_new_tokens is capped by the preset's total
    max_length (prompt included), as transformers' max_length does. `fields`: stop_tokens, pad_id."""
    if name not in SAMPLING_PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; choose from {sorted(SAMPLING_PRESETS)}")
    limit = PRESET_MAX_LENGTH.get(name)
    if limit is not None and prompt_length is not None:
        if prompt_length >= limit:
            raise ValueError(f"the prompt has {prompt_length} tokens: preset {name!r} allows {limit} in all")
        max_new_tokens = min(max_new_tokens, limit - prompt_length)
    return SamplingConfig(max_new_tokens=max_new_tokens, **SAMPLING_PRESETS[name], **fields)


class GenerateOutput(NamedTuple):
    tokens: Array  # (B, max_new_tokens) generated ids, pad_id after a stop token
    lengths: Array  # (B,) number of generated tokens, the stop token included


def top_p_filter(logits: Array, top_p: float) -> Array:
    """Set to -inf every logit outside the smallest top set whose probability mass reaches top_p."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is below top_p (so the top token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def top_k_filter(logits: Array, k: int) -> Array:
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def sample_logits(logits: Array, rng: Array, cfg: SamplingConfig) -> Array:
    """One token per row of (B, V) logits."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decode(
    model: DecodeModel,
    params: Any,
    logits: Array,
    cache: Any,
    positions: Array,
    rng: Array,
    cfg: SamplingConfig,
) -> GenerateOutput:
    """The decode loop from the prefill's last logits (B, V) and next positions (B,)."""
    b = logits.shape[0]
    stop = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        i, _, _, _, _, done = carry
        return (i < cfg.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, positions, tokens, done = carry
        tok = sample_logits(logits, jax.random.fold_in(rng, i), cfg)
        tok = jnp.where(done, cfg.pad_id, tok)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        done = done | jnp.isin(tok, stop)
        # One step more than needed after the last token; the cache has room for it.
        logits, cache = model.step(params, tok, positions, cache)
        return i + 1, logits, cache, positions + 1, tokens, done

    tokens = jnp.full((b, cfg.max_new_tokens), cfg.pad_id, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), logits, cache, positions, tokens, jnp.zeros((b,), bool))
    _, _, _, _, tokens, _ = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens, generated_lengths(tokens, cfg))


def generated_lengths(tokens: Array, cfg: SamplingConfig) -> Array:
    """Tokens up to and including the first stop token (all of them when none stopped)."""
    n = tokens.shape[1]
    is_stop = jnp.isin(tokens, jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32))
    first = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, n)
    return first.astype(jnp.int32)


@partial(jax.jit, static_argnames=("model", "cfg"))
def generate(
    model: DecodeModel,
    params: Any,
    inputs: Mapping[str, Array],
    rng: Array | None = None,
    cfg: SamplingConfig = SamplingConfig(),
) -> GenerateOutput:
    """Prefill the left-padded prompt in `inputs` (which holds `attention_mask` (B, T)), then decode.

    `inputs` holds whatever `model.prefill` reads (e.g. `input_ids`, `pixels`). rng may be None for greedy.
    """
    if rng is None:
        if cfg.temperature != 0.0:
            raise ValueError("sampling (temperature > 0) needs an rng")
        rng = jax.random.key(0)
    b, t = inputs["attention_mask"].shape
    cache = model.init_cache(b, t + cfg.max_new_tokens)
    logits, cache, positions = model.prefill(params, cache, inputs)
    return decode(model, params, logits, cache, positions, rng, cfg)
