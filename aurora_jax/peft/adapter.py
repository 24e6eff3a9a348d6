"""The adapter pytree of each method, initialised from the (possibly abstract) base param tree."""

from __future__ import annotations

import jax

from aurora_jax.peft.config import PeftConfig
from aurora_jax.peft.gqt import init_gqt
from aurora_jax.peft.lora import init_lora
from aurora_jax.peft.mode_approx import init_mode_approx

Array = jax.Array


def init_adapter(base_params: dict, cfg: PeftConfig, rng: Array) -> dict:
    """A fresh adapter for `cfg.method`; `base_params` only lends shapes (ShapeDtypeStructs are fine).

    aurora: {'shared': {U, V, C}, 'factors': {...}, 'gqt': {...}}; lora: {'lora': {<path>: {A, B}}};
    full and frozen: {} (nothing is added to the base model).
    """
    k_ma, k_gqt = jax.random.split(rng)
    if cfg.method == "aurora":
        adapter = init_mode_approx(base_params, k_ma, rank=cfg.rank, core=cfg.core, sites=cfg.sites)
        if cfg.gqt:
            gqt = init_gqt(base_params, k_gqt)
            if gqt:
                adapter["gqt"] = gqt
        return adapter
    if cfg.method == "lora":
        return {"lora": init_lora(base_params, k_ma, r=cfg.lora_r, targets=cfg.lora_targets)}
    return {}
