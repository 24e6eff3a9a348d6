"""Export a run: fold the trained adapter into dense weights and write them for JAX or PyTorch users.

`python -m aurora_jax.train.export --workdir RUN --dst DIR [--format converted|hf]`
- converted: our orbax format (+ config JSON, tokenizer, and the unfoldable GQT vectors when present),
  loadable with `aurora_jax.convert.store.load_converted` or as `model.init` of another run;
- hf: a transformers BLIP folder (config.json + model.safetensors) for PyTorch; GQT, which transformers'
  BLIP has no place for, is refused unless --drop-gqt is given.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from aurora_jax.peft import PeftConfig, combine, merge


def load_run_config(workdir: str) -> mlc.ConfigDict:
    with open(os.path.join(workdir, "config.json")) as f:
        return mlc.ConfigDict(json.load(f))


def trained_params(workdir: str, step: int | None = None) -> tuple[Any, dict, dict, PeftConfig, Any]:
    """(model config, base params with trained leaves, adapter, peft config, tokenizer) of a run's checkpoint."""
    from aurora_jax.train.loop import load_base_model, make_tokenizer

    config = load_run_config(workdir)
    tokenizer = make_tokenizer(config, workdir)
    cfg, base = load_base_model(config, tokenizer)
    peft_cfg = PeftConfig.from_dict(config.peft)
    with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints")) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    trainable = jax.tree_util.tree_map(np.asarray, restored["state"]["trainable"])
    trainable.setdefault("base", {})
    trainable.setdefault("adapter", {})
    base, adapter = combine(trainable, base, stop_gradient=False)
    return cfg, base, adapter, peft_cfg, tokenizer


def export_run(workdir: str, dst: str, *, fmt: str = "converted", drop_gqt: bool = False,
               step: int | None = None) -> str:
    cfg, base, adapter, peft_cfg, tokenizer = trained_params(workdir, step)
    merged, rest = merge(base, adapter, peft_cfg)
    merged = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), merged)
    gqt = rest.get("gqt") if rest else None
    if fmt == "converted":
        from aurora_jax.convert.store import save_converted

        extras = {"gqt": gqt} if gqt else None
        save_converted(dst, cfg, merged, extras=extras, force=True,
                       meta={"exported_from": os.path.abspath(workdir), "peft": peft_cfg.to_dict()})
    elif fmt == "hf":
        if gqt and not drop_gqt:
            raise ValueError("the adapter has GQT vectors, which transformers' BLIP cannot hold; "
                             "export with --format converted, or pass --drop-gqt")
        from aurora_jax.convert.blip import save_blip_hf

        save_blip_hf(dst, cfg, merged)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    tokenizer.save_pretrained(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--format", default="converted", choices=("converted", "hf"))
    p.add_argument("--drop-gqt", action="store_true")
    p.add_argument("--step", type=int, default=None)
    a = p.parse_args(argv)
    print(export_run(a.workdir, a.dst, fmt=a.format, drop_gqt=a.drop_gqt, step=a.step))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
