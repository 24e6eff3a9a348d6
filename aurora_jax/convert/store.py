"""Converted checkpoints on disk: orbax params (+ optional extras) and our model config as JSON.

Layout of a converted folder:
    aurora_config.json   {"format", "version", "config_class": "module:Class", "config": {...}, "meta": {...}}
    params/              orbax checkpoint of the params pytree
    extras/              optional orbax checkpoint (e.g. BLIP momentum copies and queues)
    vocab.txt, tokenizer.json, ...   tokenizer files copied from the source folder, if any
The config JSON is named apart from HF's config.json so the two never get confused.

A tree may be given whole (a nested mapping of arrays) or as a `StreamedTree` (declared shapes, then
leaves one at a time): the converters stream, so a conversion holds one tensor (plus what tensorstore
is still writing) instead of the whole model, and the written checkpoint is the same either way.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aurora_jax.config_base import config_from_dict, config_to_dict
from aurora_jax.models.stack import unstack_layers, with_scan

CONFIG_FILE = "aurora_config.json"
FORMAT = "aurora-jax-converted"
VERSION = 1
TOKENIZER_FILES = (
    "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json",
)


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def import_object(path: str) -> Any:
    """'package.module:attr' -> the object."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike,
                         names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    """Copy the tokenizer files found next to a checkpoint (folder or file) into dst; returns their names."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    copied = []
    for name in names:
        if (folder / name).is_file():
            shutil.copy2(folder / name, Path(dst) / name)
            copied.append(name)
    return copied


# Bytes handed to tensorstore and not yet on disk: enough to overlap reading the next tensor with the
# writes, small enough that a writer slower than the reader cannot queue up the model.
INFLIGHT_BYTES = 512 << 20
# Leaves produced ahead by a worker thread (reading and transposing release the GIL), so producing the
# next tensor overlaps handing the last one to tensorstore.
PREFETCH = 2


@dataclasses.dataclass(frozen=True)
class StreamedTree:
    """A tree that arrives leaf by leaf: '/'-joined path -> (shape, dtype) first, then (path, array) pairs.

    Every declared leaf must arrive exactly once, with its declared shape and dtype; the iterator may
    raise (e.g. a KeyMapError for NaN weights), and then nothing of this tree is left on disk.
    """

    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]
    leaves: Iterable[tuple[str, np.ndarray]]


class _Pending:
    """A declared leaf of a StreamedTree: what orbax sees (shape, dtype, size) until its array arrives."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype, tree: StreamedTree):
        self.path, self.shape, self.dtype, self.tree = path, tuple(shape), np.dtype(dtype), tree

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


def _stream_handler():
    """An orbax NumpyHandler that writes a StreamedTree's leaves in arrival order, as they arrive.

    Each array goes through the plain NumpyHandler (same files, same metadata type 'np.ndarray', so
    the checkpoint restores like any other); at most INFLIGHT_BYTES wait for tensorstore at a time.
    """
    import orbax.checkpoint as ocp

    class StreamHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)  # each leaf is a fresh array nobody else touches

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            slots = {v.path: (v, info, arg) for v, info, arg in zip(values, infos, args, strict=True)}
            inflight: collections.deque = collections.deque()  # (futures, bytes) in write order
            try:
                for path, array in prefetched(values[0].tree.leaves, PREFETCH):
                    _, info, arg = _take(slots, path, array)
                    inflight.append((await super().serialize([array], [info], [arg]), array.nbytes))
                    del array
                    while sum(n for _, n in inflight) > INFLIGHT_BYTES:
                        _wait(inflight.popleft()[0])
            except BaseException:
                _drain(inflight)  # no write may still run when the caller removes the folder
                raise
            if (error := _drain(inflight)) is not None:
                raise error
            if slots:
                raise ValueError(f"the stream ended without {len(slots)} declared leaves: {sorted(slots)[:5]}")
            return [ocp.future.NoopFuture()]

    return StreamHandler()


def prefetched(items: Iterable, depth: int) -> Iterator:
    """The items of `items`, produced up to `depth` ahead in a worker thread; its exceptions re-raised here."""
    done = object()
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                ready.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put((x, None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put((done, e))
            return
        put((done, None))

    worker = threading.Thread(target=produce, name="aurora-convert-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            x, error = ready.get()
            if error is not None:
                raise error
            if x is done:
                return
            yield x
    finally:
        stop.set()  # the consumer stopped early (an error): let the worker end instead of blocking
        worker.join()


def _take(slots: dict, path: str, array: np.ndarray) -> tuple:
    """The declared slot of a streamed leaf, checked against what arrived."""
    if path not in slots:
        raise ValueError(f"streamed leaf {path!r} was not declared or arrived twice")
    slot = slots.pop(path)
    want = slot[0]
    if tuple(array.shape) != want.shape or array.dtype != want.dtype:
        raise ValueError(f"streamed leaf {path!r}: declared {list(want.shape)} {want.dtype}, "
                         f"got {list(array.shape)} {array.dtype}")
    return slot


def _wait(futures) -> None:
    for f in futures:
        f.result()


def _drain(inflight: collections.deque) -> Exception | None:
    """Wait for every pending write (even after one failed); the first failure, if any."""
    first = None
    while inflight:
        try:
            _wait(inflight.popleft()[0])
        except Exception as e:  # noqa: BLE001 - returned to the caller, which raises it
            first = first or e
    return first


def _nested(flat: Mapping[str, Any]) -> dict:
    """{'a/b': x} -> {'a': {'b': x}}."""
    out: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return out


def _save_streamed(path: Path, tree: StreamedTree, force: bool, compress: bool) -> None:
    import jax
    import orbax.checkpoint as ocp

    pending = _nested({p: _Pending(p, shape, dtype, tree) for p, (shape, dtype) in tree.shapes.items()})
    registry = ocp.type_handlers.create_type_handler_registry(
        (_Pending, _stream_handler()), (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    try:
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress)
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(path.absolute(), args=ocp.args.PyTreeSave(pending), force=force)
    except BaseException:
        # orbax writes into a temporary folder and renames it when done: drop the half-written one.
        for tmp in path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_tree(path: Path, tree: Mapping | StreamedTree, force: bool, compress: bool = True) -> None:
    if isinstance(tree, StreamedTree):
        _save_streamed(path, tree, force, compress)
        return
    import jax
    import orbax.checkpoint as ocp

    # As orbax's StandardCheckpointHandler does (which has no compression switch): numpy scalars and
    # other array-likes are saved as arrays, so they restore as arrays rather than Python floats.
    def as_array(x):
        return x if isinstance(x, (np.ndarray, jax.Array)) or not hasattr(x, "__array__") else np.asarray(x)

    handler = ocp.PyTreeCheckpointHandler(use_compression=compress)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(path.absolute(), args=ocp.args.PyTreeSave(jax.tree.map(as_array, tree)), force=force)


def _is_empty(tree: Mapping | StreamedTree | None) -> bool:
    return tree is None or not (tree.shapes if isinstance(tree, StreamedTree) else tree)


def save_converted(
    dst: str | os.PathLike,
    config: Any,
    params: Mapping | StreamedTree,
    *,
    extras: Mapping | StreamedTree | None = None,
    meta: Mapping[str, Any] | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    force: bool = False,
    compress: bool = True,
) -> Path:
    """Write params (and extras) as orbax checkpoints plus the config JSON; copy tokenizer files.

    Trees may be StreamedTrees, written leaf by leaf as they arrive. `compress` (orbax's zstd, the
    default) trades CPU for a smaller folder; readers need not know either way.
    """
    dst = Path(dst)
    if isinstance(params, Mapping):  # on disk every model is per layer (layer_i), whatever layout it ran in
        config, params = with_scan(config, False), unstack_layers(dict(params))
    if (dst / CONFIG_FILE).exists() and not force:
        raise FileExistsError(f"{dst} already holds a converted checkpoint; pass force=True to overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    # The config marks a complete conversion: an overwrite that fails half-way must not keep the old one.
    (dst / CONFIG_FILE).unlink(missing_ok=True)
    _save_tree(dst / "params", params, force, compress)
    if not _is_empty(extras):
        _save_tree(dst / "extras", extras, force, compress)
    copied = copy_tokenizer_files(tokenizer_from, dst) if tokenizer_from is not None else []
    info = {
        "format": FORMAT,
        "version": VERSION,
        "config_class": class_path(type(config)),
        "config": config_to_dict(config),
        "meta": {**(meta or {}), "tokenizer_files": copied, "has_extras": not _is_empty(extras)},
    }
    # Written last: its presence marks a complete conversion.
    (dst / CONFIG_FILE).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    return dst


def read_converted_config(dst: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(config, meta) of a converted folder without touching the arrays."""
    path = Path(dst) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{dst} is not a converted checkpoint (no {CONFIG_FILE})")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} config (format={info.get('format')!r})")
    cls = import_object(info["config_class"])
    return config_from_dict(cls, info["config"]), info.get("meta", {})


def _restore_tree(path: Path, target: Mapping | None):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path.absolute())  # host numpy arrays
        return ckptr.restore(path.absolute(), target)  # abstract target: dtypes and shardings honoured


def load_converted(dst: str | os.PathLike, *, target: Mapping | None = None) -> tuple[Any, dict]:
    """(config, params) from a converted folder; `target` (abstract tree, e.g. with shardings) is optional."""
    config, _ = read_converted_config(dst)
    return config, _restore_tree(Path(dst) / "params", target)


def load_converted_extras(dst: str | os.PathLike, *, target: Mapping | None = None) -> dict | None:
    """The extras tree (momentum copies, queues) of a converted folder, or None if it has none."""
    path = Path(dst) / "extras"
    return _restore_tree(path, target) if path.exists() else None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")
