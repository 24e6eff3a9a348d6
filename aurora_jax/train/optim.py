"""AdamW with the release's per-epoch cosine (optionally warm-up), gradient clipping and accumulation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def learning_rate_schedule(
    lr: float, *, steps_per_epoch: int, epochs: int, schedule: str = "cosine_epoch", warmup_steps: int = 0
) -> optax.Schedule:
    """'cosine_epoch': lr * 0.5 * (1 + cos(pi * epoch / epochs)), constant within an epoch (the release)."""
    total = steps_per_epoch * epochs

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        if schedule == "cosine_epoch":
            epoch = jnp.floor(step / steps_per_epoch)
            value = lr * 0.5 * (1 + jnp.cos(math.pi * epoch / epochs))
        elif schedule == "cosine":
            value = lr * 0.5 * (1 + jnp.cos(math.pi * jnp.minimum(step / max(total, 1), 1.0)))
        else:
            value = jnp.asarray(lr, jnp.float32)
        if warmup_steps > 0:
            value = value * jnp.minimum(1.0, (step + 1) / warmup_steps)
        return value

    return fn


def make_optimizer(
    schedule: optax.Schedule, *, weight_decay: float, clip_norm: float = 0.0, grad_accum: int = 1
) -> optax.GradientTransformation:
    """AdamW, weight decay on every trainable tensor (one param group, as the release)."""
    parts = []
    if clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    return tx
