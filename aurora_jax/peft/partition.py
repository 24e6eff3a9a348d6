"""Trainable / frozen split: only the trainable tree is differentiated and held by the optimizer."""

from __future__ import annotations

import math

import jax
from flax import traverse_util

from aurora_jax.peft.config import PeftConfig

Array = jax.Array


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def base_trainable(path: tuple[str, ...], cfg: PeftConfig) -> bool:
    """Does the base leaf at `path` train? full: all but the ITC temperature; otherwise the chosen heads."""
    joined = "/".join(path)
    if _under(joined, "temp"):
        return cfg.train_temp
    if cfg.method == "full":
        return True
    return any(_under(joined, head) for head in cfg.train_heads)


def partition(base_params: dict, adapter: dict, cfg: PeftConfig) -> tuple[dict, dict]:
    """-> (trainable, frozen): trainable = {'adapter': adapter, 'base': the training base leaves}."""
    flat = traverse_util.flatten_dict(base_params)
    train = {k: v for k, v in flat.items() if base_trainable(k, cfg)}
    frozen = {k: v for k, v in flat.items() if k not in train}
    return ({"adapter": adapter, "base": traverse_util.unflatten_dict(train)},
            traverse_util.unflatten_dict(frozen))


def combine(trainable: dict, frozen: dict, *, stop_gradient: bool = True) -> tuple[dict, dict]:
    """Inverse of `partition` -> (base_params, adapter); frozen leaves pass through stop_gradient."""
    if stop_gradient:
        frozen = jax.tree_util.tree_map(jax.lax.stop_gradient, frozen)
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable["base"]))
    return traverse_util.unflatten_dict(flat), trainable["adapter"]


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def trainable_summary(trainable: dict, frozen: dict) -> dict[str, float]:
    n_train, n_frozen = count_params(trainable), count_params(frozen)
    total = n_train + n_frozen
    return {"trainable": n_train, "total": total, "percent": 100.0 * n_train / max(total, 1)}


def print_trainable_parameters(trainable: dict, frozen: dict) -> str:
    """Prints (and returns) peft's line: trainable params || all params || trainable%."""
    s = trainable_summary(trainable, frozen)
    line = (f"trainable params: {s['trainable']:,} || all params: {s['total']:,} "
            f"|| trainable%: {s['percent']:.4f}")
    print(line)
    return line
