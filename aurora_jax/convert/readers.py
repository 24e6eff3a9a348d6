"""Lazy tensor sources over checkpoints on disk: keys and shapes first, tensors one at a time.

Formats: HF safetensors (single or sharded with `model.safetensors.index.json`), PyTorch pickles
(`pytorch_model.bin`, sharded with `pytorch_model.bin.index.json`, or a single `.pth`/`.bin`/`.pt`
whose state dict may be wrapped as `{'model': ...}` / `{'state_dict': ...}`). Torch is imported only
when a torch file is opened. Tensors come back as numpy arrays (bfloat16 through ml_dtypes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_SUFFIXES = (".pth", ".bin", ".pt", ".ckpt")
# Keys under which training scripts wrap the state dict, tried in this order.
STATE_DICT_WRAPPERS = ("model", "state_dict", "module")


class CheckpointFormatError(ValueError):
    """The path is not a checkpoint we can read (missing, empty, corrupt or an unknown format)."""


class TensorSource:
    """A read-only mapping of checkpoint keys to tensors that reads one tensor per `read` call."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        raise NotImplementedError

    def read(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return type(self).__name__

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DictSource(TensorSource):
    """An in-memory state dict (numpy or torch values): for tests and already-loaded weights."""

    def __init__(self, tensors: Mapping[str, object], name: str = "<dict>"):
        self._t = dict(tensors)
        self._name = name

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._t[key].shape)

    def dtype(self, key: str) -> str:
        return str(self._t[key].dtype).removeprefix("torch.")

    def read(self, key: str) -> np.ndarray:
        return to_numpy(self._t[key])

    def describe(self) -> str:
        return self._name


class RenamedSource(TensorSource):
    """A view of another source under new key names; `rename` returning None hides a key."""

    def __init__(self, base: TensorSource, rename: Callable[[str], str | None]):
        self.base = base
        self._to_base: dict[str, str] = {}
        for k in base.keys():
            new = rename(k)
            if new is None:
                continue
            if new in self._to_base:
                raise ValueError(f"keys {self._to_base[new]!r} and {k!r} both rename to {new!r}")
            self._to_base[new] = k

    def keys(self) -> list[str]:
        return list(self._to_base)

    def original_key(self, key: str) -> str:
        return self._to_base[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(self._to_base[key])

    def dtype(self, key: str) -> str:
        return self.base.dtype(self._to_base[key])

    def read(self, key: str) -> np.ndarray:
        return self.base.read(self._to_base[key])

    def close(self) -> None:
        self.base.close()

    def describe(self) -> str:
        return self.base.describe()


class SafetensorsSource(TensorSource):
    """One or more safetensors files; each file is opened once and read tensor by tensor."""

    def __init__(self, files: Iterable[Path]):
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="np")
            except Exception as e:  # the rust extension raises its own exception type
                raise CheckpointFormatError(f"{f} is not a readable safetensors file: {e}") from e
            self._handles[f] = h
            for k in h.keys():
                if k in self._file_of:
                    raise CheckpointFormatError(f"key {k!r} appears in both {self._file_of[k]} and {f}")
                sl = h.get_slice(k)
                self._file_of[k] = f
                self._meta[k] = (tuple(int(s) for s in sl.get_shape()), _SAFETENSORS_DTYPES.get(
                    sl.get_dtype(), sl.get_dtype().lower()))

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> str:
        return self._meta[key][1]

    def read(self, key: str) -> np.ndarray:
        f = self._file_of[key]
        try:
            return self._handles[f].get_tensor(key)
        except TypeError:
            # numpy has no bfloat16 / float8: go through the flax framework, which knows ml_dtypes.
            from safetensors import safe_open

            with safe_open(str(f), framework="flax") as h:
                return np.asarray(h.get_tensor(key))

    def close(self) -> None:
        self._handles.clear()

    def describe(self) -> str:
        return _describe_files(self.files)


class TorchSource(TensorSource):
    """One or more torch pickles loaded memory-mapped (zip format) so tensors are paged in on read."""

    def __init__(self, files: Iterable[Path]):
        self.files = [Path(f) for f in files]
        self._state: dict[str, object] = {}
        self._file_of: dict[str, Path] = {}
        for f in self.files:
            sd = _torch_state_dict(f)
            for k, v in sd.items():
                if k in self._file_of:
                    raise CheckpointFormatError(f"key {k!r} appears in both {self._file_of[k]} and {f}")
                self._file_of[k] = f
                self._state[k] = v

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._state[key].shape)

    def dtype(self, key: str) -> str:
        return str(self._state[key].dtype).removeprefix("torch.")

    def read(self, key: str) -> np.ndarray:
        return to_numpy(self._state[key])

    def close(self) -> None:
        self._state.clear()

    def describe(self) -> str:
        return _describe_files(self.files)


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def to_numpy(x) -> np.ndarray:
    """A numpy view (no copy where possible) of a numpy array, jax array or CPU torch tensor."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        import ml_dtypes
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:  # torch's numpy bridge has no bfloat16
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _describe_files(files: list[Path]) -> str:
    if len(files) == 1:
        return str(files[0])
    return f"{files[0].parent} ({len(files)} shards)"


def _torch_state_dict(path: Path) -> dict:
    """The flat str -> tensor state dict of a torch file, unwrapping {'model': sd} style wrappers."""
    import torch

    if not path.is_file():
        raise CheckpointFormatError(f"{path} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (current) or a raw pickle (legacy, protocol 2+ starts with 0x80).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointFormatError(
            f"{path} is not a PyTorch checkpoint: neither a zip archive nor a pickle (starts with {head!r})"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as mmap_error:
        # Legacy (non-zip) pickles cannot be memory-mapped; random bytes fail either way.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointFormatError(
                f"{path} is not a readable PyTorch checkpoint: {e} (memory-mapped load: {mmap_error})"
            ) from e
    for _ in range(2):  # {'model': sd} or {'module': {'state_dict': sd}} style nesting
        if isinstance(obj, Mapping) and not _is_state_dict(obj):
            inner = next((obj[w] for w in STATE_DICT_WRAPPERS if isinstance(obj.get(w), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        found = type(obj).__name__ if not isinstance(obj, Mapping) else f"a dict with keys {list(obj)[:10]}"
        raise CheckpointFormatError(
            f"{path} holds no state dict of tensors (found {found}; looked inside {STATE_DICT_WRAPPERS})"
        )
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(d: Mapping) -> bool:
    import torch

    return len(d) > 0 and any(isinstance(v, torch.Tensor) for v in d.values())


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"{index} is not a shard index with a 'weight_map': {e}") from e
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise CheckpointFormatError(f"{index} names shard files that are missing: {missing}")
    return [index.parent / f for f in files]


def checkpoint_files(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """('safetensors' | 'torch', files) for a checkpoint file or an HF-style folder."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            kind = "safetensors" if "safetensors" in path.name else "torch"
            return kind, _index_files(path)
        if path.suffix == ".safetensors":
            return "safetensors", [path]
        if path.suffix in TORCH_SUFFIXES:
            return "torch", [path]
        raise CheckpointFormatError(
            f"{path} has an unknown checkpoint extension (expected .safetensors, {', '.join(TORCH_SUFFIXES)}"
            " or a *.index.json shard index)"
        )
    if not path.is_dir():
        raise CheckpointFormatError(f"{path} does not exist")
    # Safetensors first: HF folders may hold both formats and safetensors reads lazily.
    for name, kind in ((SAFETENSORS_INDEX, "safetensors"), (SAFETENSORS_SINGLE, "safetensors"),
                       (TORCH_INDEX, "torch"), (TORCH_SINGLE, "torch")):
        if (path / name).is_file():
            return (kind, _index_files(path / name)) if name.endswith(".json") else (kind, [path / name])
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return "safetensors", singles
    torch_files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
    if len(torch_files) == 1 and not singles:
        return "torch", torch_files
    listing = sorted(p.name for p in path.iterdir())[:20]
    raise CheckpointFormatError(
        f"{path} holds no checkpoint we can pick unambiguously (looked for {SAFETENSORS_INDEX},"
        f" {SAFETENSORS_SINGLE}, {TORCH_INDEX}, {TORCH_SINGLE}, or exactly one *.safetensors / *.pth /"
        f" *.bin); found: {listing}"
    )


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """A lazy TensorSource over a checkpoint file, a shard index or an HF-style folder."""
    kind, files = checkpoint_files(path)
    source = SafetensorsSource(files) if kind == "safetensors" else TorchSource(files)
    if not source.keys():
        raise CheckpointFormatError(f"{source.describe()} holds no tensors")
    return source
