"""`ConfigBase`: the replace / dict / JSON round trip shared by the frozen config dataclasses.

The model configs (`models.*Config`), `peft.PeftConfig` and the converted-checkpoint store
(`convert.store`) all go through `config_to_dict` / `config_from_dict`, so a config written by one
is read back by the others. This module imports nothing of aurora_jax: models, peft and convert
may all depend on it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], d: Mapping[str, Any] | Any, *, strict: bool = True) -> T:
    """Rebuild a config dataclass from a mapping or an ml_collections ConfigDict.

    Fields whose type is a dataclass are rebuilt from their dicts; lists become tuples (JSON and
    ConfigDicts give lists, frozen configs must stay hashable). `strict` refuses unknown keys and
    names them; otherwise they are dropped.
    """
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown and strict:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in names:
        if name not in d:
            continue
        value, hint = d[name], hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            kwargs[name] = config_from_dict(hint, value, strict=strict)
        else:
            kwargs[name] = _lists_to_tuples(value)
    return cls(**kwargs)


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    """Mixin for frozen config dataclasses: `replace`, `to_dict`, `from_dict`, `to_json`."""

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any] | Any, *, strict: bool = True) -> C:
        """From a mapping or a ConfigDict (nested configs as dicts); `strict` refuses unknown keys."""
        return config_from_dict(cls, d, strict=strict)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)
