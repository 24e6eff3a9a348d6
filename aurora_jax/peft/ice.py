"""Informative Context Enhancement: no parameters, retrieval training only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def informative_context(pos_cls: Array, text_cls: Array, weight: float = 0.1) -> Array:
    """Positive pairs' ITM [CLS] (B, d) + w * mean over the batch of the unimodal text [CLS] (B', d).

    Apply to positives before the ITM head; negatives and evaluation stay untouched.
    """
    context = jnp.mean(text_cls, axis=0)
    return pos_cls + weight * context.astype(pos_cls.dtype)
