"""Checkpoint conversion: lazy readers, declarative key maps, per-source maps, orbax output and a CLI.

Importing this package pulls in neither torch nor the data stack; model-specific loaders
(`load_blip`, ...) are imported on first use.
"""

from aurora_jax.convert.keymap import KeyMap, KeyMapError, Rule, ignore, rule
from aurora_jax.convert.readers import CheckpointFormatError, TensorSource, open_checkpoint
from aurora_jax.convert.store import load_converted, load_converted_extras, save_converted

_LAZY = {
    "load_blip": "aurora_jax.convert.blip",
    "convert_blip": "aurora_jax.convert.blip",
    "export_blip_hf": "aurora_jax.convert.blip",
    "save_blip_hf": "aurora_jax.convert.blip",
}

__all__ = [
    "CheckpointFormatError", "KeyMap", "KeyMapError", "Rule", "TensorSource", "ignore", "load_converted",
    "load_converted_extras", "open_checkpoint", "rule", "save_converted", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
