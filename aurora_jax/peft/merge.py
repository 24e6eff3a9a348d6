"""Folding weight deltas into the base Dense kernels, for inference and export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from aurora_jax.models.stack import match_layout, unstack_layers
from aurora_jax.peft.config import PeftConfig
from aurora_jax.peft.mode_approx import site_delta
from aurora_jax.peft.sites import aurora_sites, get_path

Array = jax.Array


def mode_approx_weight_deltas(
    base_params: dict, adapter: dict, cfg: PeftConfig
) -> dict[tuple[str, ...], Array]:
    """Dense path -> dW (in, out). Every delta is linear in x, so dW = delta(I): the training path's
    own functions, applied to the identity, so merge and training cannot disagree."""
    out = {}
    for path, site in aurora_sites(base_params, cfg.sites).items():
        P = get_path(adapter.get("factors"), site.factor_path)
        if P is None:
            continue
        n_in, n_out = base_params_kernel(base_params, path).shape
        out[path] = site_delta(site, jnp.eye(n_in, dtype=P.dtype), adapter["shared"], P, scale=cfg.scale,
                               out_width=n_out)
    return out


def lora_weight_deltas(adapter: dict, cfg: PeftConfig) -> dict[tuple[str, ...], Array]:
    flat = traverse_util.flatten_dict(adapter.get("lora", {}))
    paths = {k[:-1] for k in flat}
    return {p: (flat[p + ("A",)] @ flat[p + ("B",)]) * cfg.lora_scale for p in paths}


def base_params_kernel(base_params: dict, path: tuple[str, ...]) -> Array:
    kernel = get_path(base_params, path + ("kernel",))
    if kernel is None:
        raise KeyError(f"the base tree has no Dense kernel at {'/'.join(path)}")
    return kernel


def merge(base_params: dict, adapter: dict, cfg: PeftConfig) -> tuple[dict, dict]:
    """-> (merged base params, what is left of the adapter).

    Mode-approximation and LoRA deltas become part of the kernels (in the kernel's dtype: a bf16 base
    rounds them). GQT acts on activations, after the FFN's LayerNorm, and cannot be folded: it stays in
    the returned adapter ({'gqt': ...}), which `tuned_apply` still applies; plain `model.apply` on the
    merged params alone is the model without GQT.
    """
    layout, base_params = base_params, unstack_layers(base_params)  # adapters address layers as layer_i
    deltas = {}
    if adapter.get("factors"):
        deltas.update(mode_approx_weight_deltas(base_params, adapter, cfg))
    for path, dw in lora_weight_deltas(adapter, cfg).items():
        deltas[path] = deltas[path] + dw if path in deltas else dw
    flat = traverse_util.flatten_dict(base_params)
    for path, dw in deltas.items():
        kernel = flat[path + ("kernel",)]
        flat[path + ("kernel",)] = (kernel + dw).astype(kernel.dtype)
    rest = {"gqt": adapter["gqt"]} if adapter.get("gqt") else {}
    return match_layout(traverse_util.unflatten_dict(flat), layout), rest
