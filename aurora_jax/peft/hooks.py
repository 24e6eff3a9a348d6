"""Running a base model with an adapter, without the base model knowing about adapters.

`flax.linen.intercept_methods` wraps every module method call made while a trace runs. The interceptor
here looks at the callee's module path: a Dense whose path has an Aurora factor or a LoRA pair in the
adapter tree gets its delta added to its output; for GQT, the outputs of a BERT layer's `self_attn` and
`cross_attn` blocks are remembered and the gated term is added to the same layer's `ffn` output when
cross-attention ran. All of it happens at trace time: under `jax.jit` the compiled program holds only
the adapter arithmetic, and the adapter is an ordinary argument, so `jax.grad` sees it.
`TunedDecoder` does the same for KV-cached generation (`aurora_jax.generate`): prefill and every cached
step run under the interceptor, so cached keys/values and new tokens carry the adapter alike.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aurora_jax.models.stack import per_layer
from aurora_jax.peft.config import PeftConfig
from aurora_jax.peft.gqt import gated_query_transform
from aurora_jax.peft.lora import lora_delta
from aurora_jax.peft.mode_approx import site_delta
from aurora_jax.peft.sites import aurora_site, get_path, site_selected

Array = jax.Array
DROPOUT_RNG = "peft_dropout"  # the adapter's own rng stream, apart from the base model's "dropout"
_GQT_BLOCKS = ("self_attn", "cross_attn", "ffn")


def _identity(x: Array) -> Array:
    return x


def _dropout(module: nn.Module, rate: float, deterministic: bool) -> Callable[[Array], Array]:
    """Inverted dropout keyed by `module.make_rng`, which folds in the module path: every site differs."""
    if deterministic or rate == 0.0:
        return _identity

    def drop(z: Array) -> Array:
        keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - rate, z.shape)
        return jnp.where(keep, z / (1.0 - rate), 0.0).astype(z.dtype)

    return drop


def _check_qkv_layout(module: nn.Module) -> None:
    layout = getattr(getattr(module.parent, "cfg", None), "qkv_layout", "qkv")
    if layout != "qkv":
        raise NotImplementedError(
            f"Aurora's fused-qkv delta assumes [q | k | v] chunks, got qkv_layout={layout!r}"
        )


def adapter_interceptor(adapter: dict, cfg: PeftConfig, deterministic: bool = True) -> Callable | None:
    """The method interceptor that applies `adapter`; None when the adapter adds nothing."""
    shared, factors = adapter.get("shared"), adapter.get("factors")
    lora = adapter.get("lora")
    gqt = adapter.get("gqt") if cfg.gqt else None
    if not (factors or lora or gqt):
        return None
    records: dict[tuple[str, ...], dict[str, Array]] = {}  # per BERT layer: h_s, h_x of the running call

    def factor_of(path: tuple[str, ...]) -> Array | None:
        site = aurora_site(path)
        return get_path(factors, site.factor_path) if site_selected(path, cfg.sites) else None

    def lora_pair(path: tuple[str, ...]) -> dict | None:
        pair = get_path(lora, path)
        return pair if isinstance(pair, dict) and "A" in pair else None

    def dense_delta(module: nn.Dense, x: Array) -> Array | None:
        # Adapter trees are per layer (layer_i) in both layouts; in a scanned stack `per_layer` picks the running one.
        path = module.path
        delta = None
        site = aurora_site(path) if factors else None
        P = per_layer(path, factor_of) if site is not None else None
        if P is not None:
            if site.kind == "vit_qkv":
                _check_qkv_layout(module)
            drop = _dropout(module, cfg.dropout, deterministic)
            delta = site_delta(site, x, shared, P, drop, cfg.scale, out_width=module.features)
        pair = per_layer(path, lora_pair) if lora else None
        if pair is not None:
            drop = _dropout(module, cfg.lora_dropout, deterministic)
            d = lora_delta(x, pair["A"], pair["B"], cfg.lora_scale, drop)
            delta = d if delta is None else delta + d
        return delta

    def gqt_block(next_fun, args, kwargs, module: nn.Module) -> Any:
        layer = module.path[:-1]
        g = per_layer(layer, lambda p: get_path(gqt, p))
        out = next_fun(*args, **kwargs)
        if not (isinstance(g, dict) and "a_s" in g):
            return out
        if module.name == "self_attn":
            records[layer] = {"h_s": out}  # a new layer call starts: forget any earlier record
        elif module.name == "cross_attn":
            records.setdefault(layer, {})["h_x"] = out
        else:  # ffn: the layer output; GQT only when cross-attention ran (multimodal mode)
            rec = records.pop(layer, {})
            if "h_s" in rec and "h_x" in rec:
                out = gated_query_transform(out, rec["h_s"], rec["h_x"], g, cfg.gqt_weight)
        return out

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        if isinstance(module, nn.Dense):
            y = next_fun(*args, **kwargs)
            delta = dense_delta(module, args[0] if args else kwargs["inputs"])
            return y if delta is None else y + delta.astype(y.dtype)
        if gqt and module.name in _GQT_BLOCKS:
            return gqt_block(next_fun, args, kwargs, module)
        return next_fun(*args, **kwargs)

    return intercept


def _has_dropout(adapter: dict, cfg: PeftConfig) -> bool:
    aurora = bool(adapter.get("factors")) and cfg.dropout > 0
    return aurora or (bool(adapter.get("lora")) and cfg.lora_dropout > 0)


def _takes_deterministic(model: nn.Module, method: Callable | str | None, n_args: int) -> bool:
    """Does `method` have a `deterministic` parameter that the positional args leave unset?"""
    fn = getattr(type(model), method) if isinstance(method, str) else (method or type(model).__call__)
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return "deterministic" in names and names.index("deterministic") > n_args  # names[0] is self


def tuned_apply(
    model: nn.Module,
    base_params: dict,
    adapter: dict,
    cfg: PeftConfig,
    *args,
    method: Callable | str | None = None,
    rng: Array | None = None,
    deterministic: bool = True,
    **kwargs,
) -> Any:
    """`model.apply({'params': base_params}, *args, method=method)` with `adapter` applied.

    Dropout (adapter, and the base model's when `method` takes `deterministic`) is active only when
    deterministic=False; it then needs `rng`. The same rng gives the same output.
    """
    rngs = None
    if rng is not None:
        rngs = {"dropout": jax.random.fold_in(rng, 0), DROPOUT_RNG: jax.random.fold_in(rng, 1)}
    elif not deterministic and _has_dropout(adapter, cfg):
        raise ValueError("deterministic=False needs an rng for the adapter's dropout")
    if "deterministic" not in kwargs and _takes_deterministic(model, method, len(args)):
        kwargs["deterministic"] = deterministic
    interceptor = adapter_interceptor(adapter, cfg, deterministic)
    call = lambda: model.apply({"params": base_params}, *args, method=method, rngs=rngs, **kwargs)  # noqa: E731
    if interceptor is None:
        return call()
    with nn.intercept_methods(interceptor):
        return call()


def tuned_forward(
    model: nn.Module,
    base_params: dict,
    adapter: dict,
    cfg: PeftConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
) -> Callable[..., Any]:
    """`fwd(method, *args, **kw)` for task losses; each call draws its own dropout key from `rng`."""
    counter = itertools.count()  # trace-time counter: the same call order gives the same keys

    def fwd(method: Callable | str, *args, **kwargs) -> Any:
        key = None if rng is None else jax.random.fold_in(rng, next(counter))
        return tuned_apply(model, base_params, adapter, cfg, *args, method=method, rng=key,
                           deterministic=deterministic, **kwargs)

    return fwd


@dataclasses.dataclass(frozen=True)
class TunedDecoder:
    """A `generate.DecodeModel` that runs `base` (e.g. `OwlDecoder`) with an adapter on every path.

    Its params are `(base_params, adapter)`. The interceptor is active during the prefill and during
    each cached one-token step, so keys/values written to the KV cache carry the adapter's deltas
    (the release's BLIP decoder skips them there: WillDreamer/Aurora CP/med.py, BertSelfAttention.forward
    computes cached keys/values with the plain key/value Linears).
    Deterministic: adapter dropout is off. Hashable, as `generate` needs (PeftConfig is frozen).
    """

    base: Any
    cfg: PeftConfig

    def _intercepted(self, adapter: dict, fn: Callable[[], Any]) -> Any:
        interceptor = adapter_interceptor(adapter, self.cfg, deterministic=True)
        if interceptor is None:
            return fn()
        with nn.intercept_methods(interceptor):
            return fn()

    def init_cache(self, batch: int, max_len: int) -> Any:
        return self.base.init_cache(batch, max_len)

    def prefill(self, params: tuple[dict, dict], cache: Any, inputs: Mapping[str, Array]):
        base, adapter = params
        return self._intercepted(adapter, lambda: self.base.prefill(base, cache, inputs))

    def step(self, params: tuple[dict, dict], tokens: Array, positions: Array, cache: Any):
        base, adapter = params
        return self._intercepted(adapter, lambda: self.base.step(base, tokens, positions, cache))
