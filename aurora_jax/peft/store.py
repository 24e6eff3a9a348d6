"""Adapters on disk: the adapter alone (+ the base leaves trained with it) and its PeftConfig, for any model.

A folder holds
    aurora_adapter.safetensors  'adapter/<path>' leaves (Aurora's shared U/V/C and factors, GQT vectors, LoRA
                                pairs) and 'base/<path>' for the base leaves the run trained (`train_heads`)
    aurora_adapter.json         {"format", "version", "peft": PeftConfig, "model": the base model's config, "meta"}
(named apart from HF PEFT's adapter_config.json / adapter_model.safetensors so the two never get confused).

`load_adapter` reads it back; `apply_adapter` checks it against a base param tree (every site and shape the
PeftConfig implies for that base) and returns (base with the trained leaves, adapter) for `tuned_apply` /
`TunedDecoder`; `merge_adapter` folds it in (`peft.merge`: GQT stays apart); `load_tuned` does either for a
converted checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from aurora_jax.config_base import config_to_dict
from aurora_jax.convert.readers import open_checkpoint
from aurora_jax.convert.store import class_path, load_converted, read_converted_config
from aurora_jax.peft.adapter import init_adapter
from aurora_jax.peft.config import PeftConfig
from aurora_jax.peft.merge import merge
from aurora_jax.peft.partition import base_trainable

WEIGHTS_FILE = "aurora_adapter.safetensors"
CONFIG_FILE = "aurora_adapter.json"
FORMAT = "aurora-jax-adapter"
VERSION = 1
COMPUTE_FIELDS = ("dtype", "remat", "attention_impl")  # how a model runs, not what it is


@dataclasses.dataclass
class SavedAdapter:
    adapter: dict
    peft_cfg: PeftConfig
    base_leaves: dict  # trained base leaves, nested like the base tree
    model: dict | None  # {"config_class", "config"} of the base model it was trained on
    meta: dict


def trained_base_leaves(base: Mapping, peft_cfg: PeftConfig) -> dict:
    """The base leaves `peft_cfg` trains (its train_heads; everything for method 'full'), nested."""
    flat = traverse_util.flatten_dict(dict(base))
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if base_trainable(k, peft_cfg)})


def _flat(prefix: str, tree: Mapping) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": np.ascontiguousarray(np.asarray(v))
            for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def save_adapter(dst: str | os.PathLike, adapter: Mapping, peft_cfg: PeftConfig, *,
                 base_leaves: Mapping | None = None, model_config: Any = None, meta: Mapping | None = None) -> Path:
    """Write the adapter (+ trained base leaves) and the JSON that describes it."""
    from safetensors.numpy import save_file

    tensors = {**_flat("adapter", adapter), **_flat("base", base_leaves or {})}
    if not tensors:
        raise ValueError("nothing to save: the adapter is empty and no base leaf was trained")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / WEIGHTS_FILE), metadata={"format": FORMAT})
    info = {"format": FORMAT, "version": VERSION, "peft": peft_cfg.to_dict(),
            "model": None if model_config is None else {"config_class": class_path(type(model_config)),
                                                        "config": config_to_dict(model_config)},
            "meta": dict(meta or {})}
    (dst / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return dst


def load_adapter(src: str | os.PathLike) -> SavedAdapter:
    """A folder written by `save_adapter`, as numpy trees."""
    src = Path(src)
    path = src / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{src} holds no adapter (no {CONFIG_FILE})")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} file (format={info.get('format')!r})")
    parts: dict[str, dict] = {"adapter": {}, "base": {}}
    with open_checkpoint(src / WEIGHTS_FILE) as source:  # numpy, bfloat16 included
        for key in source.keys():
            part, _, rest = key.partition("/")
            if part not in parts:
                raise ValueError(f"{src / WEIGHTS_FILE}: unexpected tensor {key!r}")
            parts[part][rest] = source.read(key)
    return SavedAdapter(traverse_util.unflatten_dict(parts["adapter"], sep="/"), PeftConfig.from_dict(info["peft"]),
                        traverse_util.unflatten_dict(parts["base"], sep="/"), info.get("model"), info.get("meta", {}))


def _shapes(tree: Mapping) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def adapter_problems(saved: SavedAdapter, base: Mapping) -> list[str]:
    """How `saved` does not fit `base`: sites the PeftConfig implies there vs the saved ones, shapes, heads."""
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), dict(base))
    try:
        want = _shapes(jax.eval_shape(lambda k: init_adapter(abstract, saved.peft_cfg, k), jax.random.key(0)))
    except ValueError as e:  # the PeftConfig selects nothing of this base
        return [str(e)]
    got, base_shapes = _shapes(saved.adapter), _shapes(base)
    out = [f"adapter leaf {k} is missing" for k in sorted(set(want) - set(got))]
    out += [f"adapter leaf {k} has no site in this base model" for k in sorted(set(got) - set(want))]
    out += [f"adapter leaf {k}: saved {list(got[k])}, this base needs {list(want[k])}"
            for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    for k, shape in sorted(_shapes(saved.base_leaves).items()):
        if k not in base_shapes:
            out.append(f"trained base leaf {k} is not in this base model")
        elif base_shapes[k] != shape:
            out.append(f"trained base leaf {k}: saved {list(shape)}, the base has {list(base_shapes[k])}")
    return out


def apply_adapter(saved: SavedAdapter, base: Mapping) -> tuple[dict, dict]:
    """(base with the trained leaves put back, adapter), checked against `base`, for tuned_apply."""
    problems = adapter_problems(saved, base)
    if problems:
        raise ValueError("the adapter does not fit this base model:\n  " + "\n  ".join(problems))
    flat = traverse_util.flatten_dict(dict(base))
    flat.update(traverse_util.flatten_dict(saved.base_leaves))
    return traverse_util.unflatten_dict(flat), saved.adapter


# The PeftConfig fields that decide an adapter's leaves: a run continuing a saved adapter must share them.
STRUCTURE_FIELDS = ("method", "rank", "core", "sites", "gqt", "lora_r", "lora_targets")


def start_from_adapter(src: str | os.PathLike, base: Mapping, peft_cfg: PeftConfig) -> tuple[dict, dict]:
    """(base with the saved trained leaves, adapter) to start a run from a saved adapter, checked against both the
    run's PeftConfig (STRUCTURE_FIELDS) and its base model."""
    saved = load_adapter(src)
    differ = [f"peft.{f}: the adapter has {getattr(saved.peft_cfg, f)!r}, the run {getattr(peft_cfg, f)!r}"
              for f in STRUCTURE_FIELDS if _jsonable(getattr(saved.peft_cfg, f)) != _jsonable(getattr(peft_cfg, f))]
    if differ:
        raise ValueError(f"adapter_init={str(src)!r} does not match the run's peft config:\n  " + "\n  ".join(differ))
    params, adapter = apply_adapter(saved, base)
    return params, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), adapter)


def merge_adapter(saved: SavedAdapter, base: Mapping) -> tuple[dict, dict]:
    """(merged params, what cannot be folded: {'gqt': ...} or {})."""
    params, adapter = apply_adapter(saved, base)
    return merge(params, adapter, saved.peft_cfg)


def _model_fields(d: Mapping) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(dict(d), sep=".")
    return {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in COMPUTE_FIELDS}


def model_config_problems(saved: SavedAdapter, config: Any) -> list[str]:
    """Fields of the base model's config that differ from the one the adapter was trained on."""
    if not saved.model:
        return []
    if saved.model["config_class"] != class_path(type(config)):
        return [f"trained on a {saved.model['config_class']}, the base is a {class_path(type(config))}"]
    a, b = _model_fields(saved.model["config"]), _model_fields(config_to_dict(config))
    return [f"{k}: trained on {a.get(k)!r}, the base has {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if _jsonable(a.get(k)) != _jsonable(b.get(k))]


def _jsonable(v: Any) -> Any:
    """Tuples and lists compare equal, as JSON makes them."""
    return json.loads(json.dumps(v))


@dataclasses.dataclass
class Tuned:
    config: Any
    params: dict  # the base with the trained leaves (merged=False) or the merged params (merged=True)
    adapter: dict  # the adapter to apply (merged=False) or what merging leaves apart (merged=True)
    peft_cfg: PeftConfig


def load_tuned(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, *, merged: bool = False) -> Tuned:
    """An adapter folder applied to a converted base checkpoint (`convert.store`), unmerged or merged."""
    saved = load_adapter(adapter_dir)
    config, _ = read_converted_config(base_dir)
    problems = model_config_problems(saved, config)
    if problems:
        raise ValueError(f"{adapter_dir} was trained on another model than {base_dir}:\n  " + "\n  ".join(problems))
    _, base = load_converted(base_dir)
    params, adapter = (merge_adapter if merged else apply_adapter)(saved, base)
    return Tuned(config, params, adapter, saved.peft_cfg)
