"""Read a training run back and export it: the adapter folded into dense weights, or the adapter alone.

`python -m aurora_jax.train.export --workdir RUN --dst DIR [--format FMT] [--drop-gqt] [--step N]`
- converted (every model family): our orbax format (+ config JSON, tokenizer, and the unfoldable GQT vectors
  when present), loadable with `aurora_jax.convert.store.load_converted` or as `model.init` of another run;
- hf: merged weights for PyTorch: a transformers BLIP folder (GQT, which transformers' BLIP has no place for, is
  refused unless --drop-gqt is given), or an mPLUG-Owl / Owl2 folder in the release's key layout;
- peft (Owl LoRA runs): the adapter alone as an HF PEFT folder for `peft.PeftModel.from_pretrained`;
- aurora (every family): the adapter alone as a small safetensors file that `aurora_jax.peft.store` applies
  to a base checkpoint;
- release (BLIP Aurora runs): the adapter and trained heads as `{'model': state_dict}` under the Aurora release's
  names (WillDreamer/Aurora), for its models' `load_state_dict(..., strict=False)`.
A format that would lose something the run trained is refused, naming it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from aurora_jax.convert.store import save_converted
from aurora_jax.models.stack import unstack_layers, with_scan
from aurora_jax.peft import PeftConfig, combine, merge
from aurora_jax.train.checkpoint import Checkpointer
from aurora_jax.train.config import recipe_module
from aurora_jax.train.recipes import ADAPTER_FORMATS


def load_run_config(workdir: str) -> mlc.ConfigDict:
    """The config a run was started with (`<workdir>/config.json`); runs from before recipes are recognised."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a training run: no config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    d.setdefault("recipe", "owl" if "stage" in d else "blip")
    return mlc.ConfigDict(d)


@dataclasses.dataclass
class TrainedRun:
    """A run read back: base params with the trained base leaves put back, and the adapter kept apart."""

    recipe: Any
    config: mlc.ConfigDict
    cfg: Any  # model config as loaded (float32)
    base: dict
    adapter: dict
    peft_cfg: PeftConfig
    tokenizer: Any
    step: int


def load_run(workdir: str, step: int | None = None) -> TrainedRun:
    """The newest (or `step`'s) checkpoint of a run, through the run's recipe and the one Checkpointer."""
    workdir = os.path.abspath(workdir)
    config = load_run_config(workdir)
    recipe = recipe_module(config.recipe)
    tokenizer = recipe.tokenizer(config, workdir)
    cfg, base = recipe.load_base(config, tokenizer, workdir)
    peft_cfg = recipe.peft_config(config)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        state, _ = ckpt.restore(step, with_data=False)
    finally:
        ckpt.close()
    trainable = jax.tree_util.tree_map(np.asarray, dict(state["trainable"]))
    # A scanned run (model.scan_layers) checkpoints stacked base leaves; the base read back is per layer.
    trainable = {"adapter": trainable.get("adapter") or {}, "base": unstack_layers(trainable.get("base") or {})}
    full, adapter = combine(trainable, base, stop_gradient=False)
    return TrainedRun(recipe, config, cfg, full, adapter, peft_cfg, tokenizer, int(step))


def export_merged(recipe: Any, cfg: Any, base: dict, adapter: dict, peft_cfg: PeftConfig, tokenizer: Any, dst: str,
                  *, fmt: str = "converted", drop_gqt: bool = False, meta: dict | None = None) -> str:
    """Fold the adapter into the base and write `fmt` (converted, or one of the recipe's export formats);
    the adapter-only formats (ADAPTER_FORMATS) are written from the unmerged adapter, without merging."""
    cfg, base = with_scan(cfg, False), unstack_layers(base)  # every format is per layer, as the releases
    if fmt != "converted" and fmt not in recipe.export_formats:
        raise ValueError(f"recipe {recipe.name!r} exports {', '.join(('converted', *recipe.export_formats))}; "
                         f"not {fmt!r}")
    if fmt in ADAPTER_FORMATS:
        merged, rest = None, {}
    else:
        merged, rest = merge(base, adapter, peft_cfg)
        merged = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), merged)
        rest = rest or {}
    if fmt == "converted":
        gqt = rest.get("gqt")
        save_converted(dst, cfg, merged, extras={"gqt": gqt} if gqt else None, force=True,
                       meta={**(meta or {}), "recipe": recipe.name, "peft": peft_cfg.to_dict()})
    else:
        recipe.export(fmt, dst, cfg, merged, rest, drop_gqt=drop_gqt, adapter=adapter, peft_cfg=peft_cfg, base=base)
    tokenizer.save_pretrained(dst)
    return dst


def export_run(workdir: str, dst: str, *, fmt: str = "converted", drop_gqt: bool = False,
               step: int | None = None) -> str:
    r = load_run(workdir, step)
    return export_merged(r.recipe, r.cfg, r.base, r.adapter, r.peft_cfg, r.tokenizer, dst, fmt=fmt,
                         drop_gqt=drop_gqt, meta={"exported_from": os.path.abspath(workdir), "step": r.step})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--format", default="converted",
                   help="converted, or a format of the run's recipe (BLIP: hf, aurora, release; Owl: hf, peft, aurora)")
    p.add_argument("--drop-gqt", action="store_true")
    p.add_argument("--step", type=int, default=None)
    a = p.parse_args(argv)
    try:
        print(export_run(a.workdir, a.dst, fmt=a.format, drop_gqt=a.drop_gqt, step=a.step))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
