"""Lazy tensor sources over checkpoints on disk: keys and shapes first, tensors one at a time.

Formats: HF safetensors (single or sharded with `model.safetensors.index.json`), PyTorch pickles
(`pytorch_model.bin`, sharded with `pytorch_model.bin.index.json`, or a single `.pth`/`.bin`/`.pt`
whose state dict may be wrapped as `{'model': ...}` / `{'state_dict': ...}`). Torch is imported only
when a torch file is opened. Tensors come back as numpy arrays (bfloat16 through ml_dtypes).
`location` gives a reading order (file by file, front to back) and `release` lets a source drop a
tensor it will not be asked for again, so a full conversion never keeps the whole checkpoint resident.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import ml_dtypes
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

    def location(self, key: str) -> tuple[int, int]:
        """(file number, byte offset) of a tensor: reading in this order reads each file front to back."""
        return (0, 0)

    def release(self, key: str) -> None:
        """The caller will not read `key` again: drop what keeps its memory mapped."""

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

    def location(self, key: str) -> tuple[int, int]:
        return self.base.location(self._to_base[key])

    def release(self, key: str) -> None:
        self.base.release(self._to_base[key])

    def close(self) -> None:
        self.base.close()

    def describe(self) -> str:
        return self.base.describe()


class SafetensorsSource(TensorSource):
    """One or more safetensors files, read tensor by tensor with plain file reads.

    `safe_open` validates each file; the data is then read with read(2) into a fresh array at the
    header's offsets instead of through safe_open's memory map, whose touched pages would stay in the
    process's resident set until the file is closed (the whole checkpoint, for a full conversion).
    """

    def __init__(self, files: Iterable[Path]):
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        self._file_of: dict[str, int] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._offset: dict[str, int] = {}
        for i, f in enumerate(self.files):
            try:
                safe_open(str(f), framework="np")  # validates the header against the file's size
            except Exception as e:  # the rust extension raises its own exception type
                raise CheckpointFormatError(f"{f} is not a readable safetensors file: {e}") from e
            for k, (shape, dtype, offset) in _safetensors_header(f).items():
                if k in self._file_of:
                    raise CheckpointFormatError(
                        f"key {k!r} appears in both {self.files[self._file_of[k]]} and {f}")
                self._file_of[k] = i
                self._meta[k] = (shape, _SAFETENSORS_DTYPES.get(dtype, dtype.lower()))
                self._offset[k] = offset

    def keys(self) -> list[str]:
        return list(self._file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> str:
        return self._meta[key][1]

    def read(self, key: str) -> np.ndarray:
        shape, name = self._meta[key]
        try:
            dtype = np_dtype(name)
        except TypeError as e:
            raise CheckpointFormatError(f"{key!r} in {self.files[self._file_of[key]]} has dtype {name!r},"
                                        " which numpy cannot represent") from e
        x = np.empty(shape, dtype)
        path = self.files[self._file_of[key]]
        if not _read_into(path, self._offset[key], x.reshape(-1).view(np.uint8)):
            raise CheckpointFormatError(f"{path} is truncated inside {key!r}")
        return x

    def location(self, key: str) -> tuple[int, int]:
        return (self._file_of[key], self._offset[key])

    def describe(self) -> str:
        return _describe_files(self.files)


def _read_into(path: Path, offset: int, buf: np.ndarray) -> bool:
    """Fill a byte array from `path` at `offset`; False if the file ends first."""
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])  # one read(2) moves at most ~2 GiB
            if not n:
                return False
            done += n
    return True


def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """key -> (shape, safetensors dtype, absolute data offset); the file is 8-byte length, JSON, data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (tuple(int(s) for s in v["shape"]), v["dtype"], 8 + n + int(v["data_offsets"][0]))
            for k, v in header.items() if k != "__metadata__"}


class TorchSource(TensorSource):
    """One or more torch pickles loaded memory-mapped (zip format) so tensors are paged in on read."""

    def __init__(self, files: Iterable[Path]):
        self.files = [Path(f) for f in files]
        self._state: dict[str, object] = {}
        self._file_of: dict[str, int] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for i, f in enumerate(self.files):
            sd = _torch_state_dict(f)
            for k, v in sd.items():
                if k in self._file_of:
                    raise CheckpointFormatError(
                        f"key {k!r} appears in both {self.files[self._file_of[k]]} and {f}")
                self._file_of[k] = i
                self._state[k] = v
                self._meta[k] = (tuple(int(s) for s in v.shape), str(v.dtype).removeprefix("torch."))

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> str:
        return self._meta[key][1]

    def read(self, key: str) -> np.ndarray:
        if key not in self._state:
            raise KeyError(f"{key!r} was released: it cannot be read again")
        return to_numpy(self._state[key])

    def location(self, key: str) -> tuple[int, int]:
        return (self._file_of[key], 0)  # storages' offsets are the zip's business: file order only

    def release(self, key: str) -> None:
        # A memory-mapped file's pages stay resident while any of its tensors is referenced.
        self._state.pop(key, None)

    def close(self) -> None:
        self._state.clear()

    def describe(self) -> str:
        return _describe_files(self.files)


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
    "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool", "C64": "complex64",
}


def np_dtype(dtype) -> np.dtype:
    """numpy dtype from a dtype or a name, including ml_dtypes' names ('bfloat16', 'float8_e4m3fn')."""
    if isinstance(dtype, str) and isinstance(getattr(ml_dtypes, dtype, None), type):
        return np.dtype(getattr(ml_dtypes, dtype))
    return np.dtype(dtype)


def to_numpy(x) -> np.ndarray:
    """A numpy view (no copy where possible) of a numpy array, jax array or CPU torch tensor."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
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
