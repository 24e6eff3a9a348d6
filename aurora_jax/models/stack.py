"""A stack of identical blocks: unrolled (`layer_0` ... `layer_{n-1}`) or under `nn.scan` (one `layers` module).

Unrolled, XLA compiles every block separately; scanned, it compiles one block and loops over parameters stacked on
a leading `layers` logical axis, so compile time and program size no longer grow with depth. Both layouts hold the
same numbers: `stack_layers` / `unstack_layers` move a parameter tree between them, and `match_layout` brings a tree
(a converted checkpoint is always unrolled, as the releases are) into the layout a model expects.

Per-layer values that are not parameters (an adapter's factors, a layer's drop-path rate, KV caches) reach the
running layer by index: `current_layer(path)` gives the traced index of the scanned layer a module path lies in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LAYERS = "layers"  # the scanned stack's module name and the logical axis of its stacked parameters
_LAYER = re.compile(r"layer_(\d+)")
# Every rng stream draws anew in each layer (dropout, drop path, adapter dropout), as unrolled layers do.
_SPLIT_ALL = {True: True}
_RUNNING: list[tuple[tuple[str, ...], Array, int]] = []  # scanned stacks being traced: (path, layer index, depth)


def layer_name(i: int) -> str:
    return f"layer_{i}"


@contextlib.contextmanager
def _running(path: tuple[str, ...], index: Array, depth: int) -> Iterator[None]:
    _RUNNING.append((tuple(path), index, depth))
    try:
        yield
    finally:
        _RUNNING.pop()


def current_layer(path: Sequence[str]) -> tuple[int, Array, int] | None:
    """(position of `layers` in `path`, traced layer index, depth) if `path` lies in a scanned stack being traced."""
    path = tuple(path)
    for stack_path, index, depth in reversed(_RUNNING):
        if path[: len(stack_path)] == stack_path:
            return len(stack_path) - 1, index, depth
    return None


def unrolled_path(path: Sequence[str], position: int, i: int) -> tuple[str, ...]:
    """`path` with the scanned stack's name at `position` replaced by layer i's."""
    path = tuple(path)
    return (*path[:position], layer_name(i), *path[position + 1:])


def per_layer(path: Sequence[str], fetch: Callable[[tuple[str, ...]], Any]) -> Any:
    """`fetch(path)`; inside a scanned stack, the running layer's entry of `fetch(unrolled path of layer i)`.

    Layers whose entry is None get zeros of the others' shapes (adapter entries are linear in their values, so
    zeros add nothing); None when no layer has one.
    """
    running = current_layer(path)
    if running is None:
        return fetch(tuple(path))
    position, index, depth = running
    entries = [fetch(unrolled_path(path, position, i)) for i in range(depth)]
    present = next((e for e in entries if e is not None), None)
    if present is None:
        return None
    entries = [jax.tree.map(jnp.zeros_like, present) if e is None else e for e in entries]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *entries)
    return jax.tree.map(lambda a: a[index], stacked)


def layer_stack(
    make: Callable[[str], nn.Module],
    depth: int,
    x: Any,
    step: Callable[[nn.Module, Any, Any], tuple[Any, Any]],
    *,
    scan: bool,
    xs: Any = None,
) -> tuple[Any, Any]:
    """Run `x, y_i = step(block_i, x, xs_i)` over `depth` blocks `make(name)`; returns (x, ys).

    Unrolled: `xs` is a sequence (or None) indexed by layer and ys is the list of the y_i. Scanned: `xs` is a pytree
    with a leading `depth` axis and ys is stacked likewise.
    """
    if not scan:
        ys = []
        for i in range(depth):
            x, y = step(make(layer_name(i)), x, None if xs is None else xs[i])
            ys.append(y)
        return x, ys

    def body(block: nn.Module, carry: Any, inputs: tuple[Array, Any]) -> tuple[Any, Any]:
        index, xs_i = inputs
        with _running(block.path, index, depth):
            return step(block, carry, xs_i)

    scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs=_SPLIT_ALL, length=depth,
                      metadata_params={nn.PARTITION_NAME: LAYERS})
    return scanned(make(LAYERS), x, (jnp.arange(depth), xs))


# ------------------------------------------------------------------------------------- parameter layouts


def _layer_indices(node: dict) -> list[int] | None:
    """The layer numbers of a dict whose keys include layer_0 .. layer_{n-1}, else None."""
    found = sorted(int(m.group(1)) for k in node if (m := _LAYER.fullmatch(str(k))))
    return found if found and found == list(range(len(found))) else None


def stack_layers(tree: dict, where: Callable[[tuple[str, ...]], bool] = lambda path: True,
                 _path: tuple[str, ...] = ()) -> dict:
    """Every dict with `layer_i` children (at a path `where` accepts) gets one `layers` child instead, each leaf
    stacked over i (numpy for host arrays, jnp for device arrays)."""
    if not isinstance(tree, dict):
        return tree
    out = {k: stack_layers(v, where, (*_path, k)) for k, v in tree.items()}
    idx = _layer_indices(out)
    if idx is None or LAYERS in out or not where(_path):
        return out
    layer_trees = [out.pop(layer_name(i)) for i in idx]

    def stack(*leaves):
        xp = np if all(isinstance(a, np.ndarray | np.generic) for a in leaves) else jnp
        return xp.stack(leaves)

    out[LAYERS] = jax.tree.map(stack, *layer_trees)
    return out


def unstack_layers(tree: dict) -> dict:
    """The inverse of `stack_layers`: every `layers` child becomes layer_0 .. layer_{n-1}."""
    if not isinstance(tree, dict):
        return tree
    out = {k: unstack_layers(v) for k, v in tree.items() if k != LAYERS}
    if LAYERS in tree:
        stacked = unstack_layers(tree[LAYERS])
        depth = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(depth):
            out[layer_name(i)] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out


def scanned_paths(abstract: dict, _path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The paths of the dicts that hold a scanned `layers` child in a (model's abstract) parameter tree."""
    if not isinstance(abstract, dict):
        return set()
    found = {_path} if LAYERS in abstract else set()
    for k, v in abstract.items():
        if k != LAYERS:
            found |= scanned_paths(v, (*_path, k))
    return found


def match_layout(params: dict, abstract: dict) -> dict:
    """`params` (either layout) in the layout of `abstract`: stacked where the model scans, unrolled elsewhere."""
    want = scanned_paths(abstract)
    return stack_layers(unstack_layers(params), where=lambda path: path in want) if want else unstack_layers(params)


def with_scan(cfg: Any, scan: bool) -> Any:
    """`cfg` with every (nested) model config that has a `scan` field set to `scan` (ViT, BERT, LLaMA)."""
    if not dataclasses.is_dataclass(cfg):
        return cfg
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "scan":
            changes[f.name] = scan
        elif dataclasses.is_dataclass(value):
            changes[f.name] = with_scan(value, scan)
    return dataclasses.replace(cfg, **changes)


def _stack_fields(cfg: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Field paths of the nested model configs that are layer stacks (those with a `scan` field), in field order."""
    if not dataclasses.is_dataclass(cfg):
        return []
    if any(f.name == "scan" for f in dataclasses.fields(cfg)):
        return [prefix]
    return [p for f in dataclasses.fields(cfg) for p in _stack_fields(getattr(cfg, f.name), (*prefix, f.name))]


def stack_depths(cfg: Any) -> list[int]:
    """`num_layers` of every layer stack of a model config (e.g. BLIP: ViT, BERT; Owl: ViT, LLaMA)."""
    out = []
    for path in _stack_fields(cfg):
        sub = cfg
        for name in path:
            sub = getattr(sub, name)
        out.append(sub.num_layers)
    return out


def with_depths(cfg: Any, depths: Sequence[int]) -> Any:
    """`cfg` with its layer stacks (`stack_depths` order) at these depths."""
    def rebuild(node: Any, path: tuple[str, ...]) -> Any:
        if not path:
            return dataclasses.replace(node, num_layers=next(it))
        return dataclasses.replace(node, **{path[0]: rebuild(getattr(node, path[0]), path[1:])})

    it = iter(depths)
    for p in _stack_fields(cfg):
        cfg = rebuild(cfg, p)
    return cfg
