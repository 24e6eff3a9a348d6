"""Converted checkpoints on disk: orbax params (+ optional extras) and our model config as JSON.

Layout of a converted folder:
    aurora_config.json   {"format", "version", "config_class": "module:Class", "config": {...}, "meta": {...}}
    params/              orbax checkpoint of the params pytree
    extras/              optional orbax checkpoint (e.g. BLIP momentum copies and queues)
    vocab.txt, tokenizer.json, ...   tokenizer files copied from the source folder, if any
The config JSON is named apart from HF's config.json so the two never get confused.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "aurora_config.json"
FORMAT = "aurora-jax-converted"
VERSION = 1
TOKENIZER_FILES = (
    "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json",
)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config)


def config_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Rebuild a config dataclass, recursing into fields whose type is itself a dataclass."""
    if hasattr(cls, "from_dict"):
        return cls.from_dict(dict(d))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints.get(f.name)
        if dataclasses.is_dataclass(t) and isinstance(v, Mapping):
            v = config_from_dict(t, v)
        elif isinstance(v, list):
            v = tuple(v)  # frozen configs hold tuples; JSON gives lists
        kwargs[f.name] = v
    return cls(**kwargs)


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


def _save_tree(path: Path, tree: Mapping, force: bool) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute(), tree, force=force)
        ckptr.wait_until_finished()


def save_converted(
    dst: str | os.PathLike,
    config: Any,
    params: Mapping,
    *,
    extras: Mapping | None = None,
    meta: Mapping[str, Any] | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Write params (and extras) as orbax checkpoints plus the config JSON; copy tokenizer files."""
    dst = Path(dst)
    if (dst / CONFIG_FILE).exists() and not force:
        raise FileExistsError(f"{dst} already holds a converted checkpoint; pass force=True to overwrite")
    dst.mkdir(parents=True, exist_ok=True)
    _save_tree(dst / "params", params, force)
    if extras:
        _save_tree(dst / "extras", extras, force)
    copied = copy_tokenizer_files(tokenizer_from, dst) if tokenizer_from is not None else []
    info = {
        "format": FORMAT,
        "version": VERSION,
        "config_class": class_path(type(config)),
        "config": config_to_dict(config),
        "meta": {**(meta or {}), "tokenizer_files": copied, "has_extras": bool(extras)},
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
