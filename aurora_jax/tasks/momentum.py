"""Momentum distillation state (BLIP/ALBEF retrieval): an EMA copy of what trains and queues of momentum features.

The momentum ("teacher") model is an exponential moving average of the trainable tree (trained heads, Aurora's
per-site factors and GQT vectors, LoRA pairs), except Aurora's shared U/V/C: the release keeps those on the top-level
model and hands the live ones to its momentum encoders (WillDreamer/Aurora CP/blip_retrieval.py), so the teacher
reads them from the online adapter. The frozen base is shared with the online model, since the EMA of a constant is
that constant; when a checkpoint brings its own momentum copies (Salesforce `*_m`), those frozen parts are kept and
moved towards the online base like every other momentum parameter, as BLIP does. Queues hold the momentum features
of past global batches.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from aurora_jax.models.blip import l2_normalize
from aurora_jax.models.stack import match_layout

Array = jax.Array
Queues = dict[str, Array]  # {'image_feat': (Q, D), 'text_feat': (Q, D), 'idx': (Q,) int32, 'ptr': () int32}
NO_INDEX = -100  # idx of an empty queue slot: never equal to a real image index

log = logging.getLogger("aurora_jax")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """What a momentum-aware task loss receives inside the train step."""

    fwd: Callable  # fwd(method, *args) of the momentum model (in train mode, as the release's, unless turned off)
    queues: Queues  # before this step's enqueue
    step: Array  # the step being taken (0-based), for the alpha ramp


# ------------------------------------------------------------------------------------------------ EMA


def ema_update(momentum: Any, online: Any, m: float | Array) -> Any:
    """p_m <- m * p_m + (1 - m) * p, leaf by leaf (momentum leaves keep their dtype)."""
    return jax.tree_util.tree_map(lambda pm, p: m * pm + (1 - m) * p.astype(pm.dtype), momentum, online)


def _flat(tree: Mapping) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _subtree(tree: Mapping, like: Mapping) -> dict:
    """The entries of `tree` at the paths of `like` (empty subtrees kept, so the two trees have one structure)."""
    return {k: _subtree(tree[k], v) if isinstance(v, Mapping) else tree[k] for k, v in like.items()}


SHARED = "shared"  # the adapter's U/V/C: live in the teacher, never averaged


def ema_part(adapter: Mapping) -> dict:
    """The adapter leaves the momentum model keeps an EMA of: all but the shared U/V/C."""
    return {k: v for k, v in adapter.items() if k != SHARED}


def init_momentum(trainable: dict, frozen: dict, checkpoint_momentum: Mapping | None = None) -> dict:
    """{'trainable': a copy of `trainable` less the shared U/V/C} (+ 'frozen': checkpoint copies of frozen parts, f32).

    `checkpoint_momentum` is `load_blip(..., momentum=True)[2]['momentum']` (base-shaped trees of the `*_m`
    parameters): trained heads start from their copy, frozen parts are kept apart, the adapter starts online
    (or from `checkpoint_momentum['adapter']`, a release checkpoint's momentum factors and GQT).
    """
    checkpoint_momentum = dict(checkpoint_momentum or {})
    adapter_m = checkpoint_momentum.pop("adapter", None)
    own = {"adapter": ema_part(trainable["adapter"]), "base": trainable["base"]}
    mom_trainable = jax.tree_util.tree_map(jnp.copy, own)  # own buffers: the step donates the state
    if adapter_m is not None:
        mom_trainable["adapter"] = jax.tree_util.tree_map(lambda a, b: jnp.array(b, a.dtype),
                                                          mom_trainable["adapter"], _subtree(adapter_m, own["adapter"]))
    if not checkpoint_momentum:
        return {"trainable": mom_trainable}
    ckpt = _flat(match_layout(checkpoint_momentum, frozen))  # converted copies are per layer; a scanned run stacks
    head, frozen_flat = _flat(mom_trainable["base"]), _flat(frozen)
    unknown = [k for k in ckpt if k not in head and k not in frozen_flat]
    if unknown:
        raise KeyError(f"momentum copies without an online parameter: {['/'.join(k) for k in unknown[:5]]}")
    head = {k: jnp.array(ckpt[k], v.dtype) if k in ckpt else v for k, v in head.items()}
    mom_trainable = {"adapter": mom_trainable["adapter"], "base": traverse_util.unflatten_dict(head)}
    mom_frozen = {k: jnp.array(v, jnp.float32) for k, v in ckpt.items() if k in frozen_flat}
    out = {"trainable": mom_trainable}
    if mom_frozen:  # f32: an EMA step of 0.5% vanishes in bfloat16
        out["frozen"] = traverse_util.unflatten_dict(mom_frozen)
    return out


def update_momentum(momentum: dict, trainable: dict, frozen: dict, m: float | Array) -> dict:
    """One EMA step of the whole momentum model towards the online one."""
    out = {"trainable": ema_update(momentum["trainable"], _subtree(trainable, momentum["trainable"]), m)}
    if "frozen" in momentum:
        out["frozen"] = ema_update(momentum["frozen"], _subtree(frozen, momentum["frozen"]), m)
    return out


def momentum_params(momentum: dict, frozen: dict, trainable: dict) -> tuple[dict, dict]:
    """(base params, adapter) of the momentum model, without gradients: its own copies over the shared base,
    and the online model's live shared U/V/C (`trainable`, before this step's update)."""
    flat = _flat(frozen)
    for k, v in _flat(momentum.get("frozen", {})).items():
        flat[k] = v.astype(flat[k].dtype)  # compute like the online model does
    flat.update(_flat(momentum["trainable"]["base"]))
    base = traverse_util.unflatten_dict(flat)
    adapter = dict(momentum["trainable"]["adapter"])
    if SHARED in trainable["adapter"]:
        adapter[SHARED] = trainable["adapter"][SHARED]
    return jax.lax.stop_gradient((base, adapter))


# --------------------------------------------------------------------------------------------- queues


def init_queues(rng: Array, size: int, dim: int) -> Queues:
    """Random unit features (as BLIP starts its queues), no indices, pointer at 0."""
    k1, k2 = jax.random.split(rng)
    return {
        "image_feat": l2_normalize(jax.random.normal(k1, (size, dim), jnp.float32)),
        "text_feat": l2_normalize(jax.random.normal(k2, (size, dim), jnp.float32)),
        "idx": jnp.full((size,), NO_INDEX, jnp.int32),
        "ptr": jnp.zeros((), jnp.int32),
    }


def queues_from_checkpoint(buffers: Mapping[str, Any], size: int, dim: int, rng: Array) -> Queues:
    """Salesforce buffers (image_queue/text_queue (D, Q), idx_queue (1, Q), ptr_queue (1,)) -> our queues.

    As BLIP's loader, buffers whose shape does not fit are dropped (fresh queues instead). Pre-training
    checkpoints have no idx_queue and a `queue_ptr` of another model: indices start empty, the pointer at 0.
    """
    fresh = init_queues(rng, size, dim)
    feats = {name: buffers.get(key) for name, key in (("image_feat", "image_queue"), ("text_feat", "text_queue"))}
    if any(v is None or tuple(np.shape(v)) != (dim, size) for v in feats.values()):
        log.warning("checkpoint queues do not fit (%d, %d): starting fresh queues", dim, size)
        return fresh
    out = dict(fresh, **{k: jnp.asarray(np.asarray(v, np.float32).T) for k, v in feats.items()})
    if buffers.get("idx_queue") is not None:
        out["idx"] = jnp.asarray(np.asarray(buffers["idx_queue"]).reshape(-1), jnp.int32)
    if buffers.get("ptr_queue") is not None:
        out["ptr"] = jnp.asarray(np.asarray(buffers["ptr_queue"]).reshape(()), jnp.int32)
    return out


def enqueue(queues: Queues, image_feat: Array, text_feat: Array, idx: Array) -> Queues:
    """Write a (global) batch of momentum features at the pointer and advance it modulo the queue size.

    The queue size must be a multiple of the batch, so a write never wraps (BLIP asserts the same).
    """
    size, b = queues["idx"].shape[0], idx.shape[0]
    if size % b:
        raise ValueError(f"queue size {size} is not a multiple of the global batch {b}")
    ptr = queues["ptr"]
    put = lambda q, x: jax.lax.dynamic_update_slice_in_dim(q, x.astype(q.dtype), ptr, axis=0)
    return {
        "image_feat": put(queues["image_feat"], jax.lax.stop_gradient(image_feat)),
        "text_feat": put(queues["text_feat"], jax.lax.stop_gradient(text_feat)),
        "idx": put(queues["idx"], idx),
        "ptr": ((ptr + b) % size).astype(jnp.int32),
    }


def alpha_ramp(alpha: float, step: Array | int, steps_per_epoch: int) -> Array:
    """Distillation weight: alpha * min(1, step / steps_per_epoch), i.e. ramped over the first epoch."""
    return alpha * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(steps_per_epoch, 1))
