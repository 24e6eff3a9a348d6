"""The config keys every run shares (seed, dtype, mesh, optimizer, checkpoints, logging, evaluation) and the
one `validate`; each recipe (`train/recipes/`) adds its family's keys (`model`, `peft`, `data`, ...).

A config file starts from `base_config("blip")` or `base_config("owl")` and overrides; `config.recipe` names
the recipe the engine runs.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

import jax
import ml_collections as mlc

from aurora_jax.parallel.mesh import DEFAULT_RULES, mesh_shape

RECIPES = ("blip", "owl")
SCHEDULES = ("cosine_epoch", "cosine", "constant")
MESH_AXES = ("data", "fsdp", "tensor")


def shared_config() -> mlc.ConfigDict:
    """The keys of the engine; recipes override their defaults."""
    c = mlc.ConfigDict()
    c.recipe = "blip"
    c.seed = 0
    c.compute_dtype = "float32"  # "bfloat16": frozen weights and activations in bf16, what trains stays f32

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.05
    c.optim.epochs = 5
    c.optim.batch_size = 16  # global batch per micro-step
    c.optim.grad_accum = 1
    c.optim.warmup_steps = 0
    c.optim.warmup_ratio = 0.0  # > 0: warm-up over this fraction of the optimizer steps (overrides warmup_steps)
    c.optim.schedule = "cosine_epoch"  # the release's per-epoch cosine; "cosine" (per step) or "constant"
    c.optim.clip_norm = 0.0

    c.eval = mlc.ConfigDict()
    c.eval.at_start = True
    c.eval.every_epochs = 1
    c.eval.batch_size = 32

    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    c.sharding_rules = ()  # ((logical name, mesh axes or None), ...) in front of parallel.mesh's table
    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3
    c.log_every = 10
    c.max_nonfinite_steps = 10  # consecutive skipped (non-finite) steps before the run stops with an error
    c.resume = mlc.ConfigDict()
    c.resume.allow_new_base = False  # resume a workdir on another backbone than its checkpoints were trained on
    # An adapter folder (aurora_jax.peft.store: `train.export --format aurora`, or `python -m aurora_jax.convert
    # aurora-release`) the adapter and its trained heads start from, instead of a fresh init.
    c.adapter_init = ""
    c.max_steps = -1  # stop early (tests); -1 = run all epochs
    c.export = False  # at the end, write the merged model to <workdir>/export (train.export's converted format)
    c.then = ""  # another config file to run afterwards in <workdir>/<its name> (the demo chains VQA)
    return c


def recipe_module(name: str) -> Any:
    """The recipe named by `config.recipe` (a module of train/recipes/, imported on demand)."""
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r}: choose from {RECIPES}")
    return importlib.import_module(f"aurora_jax.train.recipes.{name}").RECIPE


def base_config(recipe: str = "blip") -> mlc.ConfigDict:
    """Every key a run of `recipe` may set: the shared keys with the recipe's part merged in."""
    c = shared_config()
    part = recipe_module(recipe).base_config()
    c.recipe = recipe
    for key, value in part.items():
        if isinstance(value, mlc.ConfigDict) and key in c:
            for k, v in value.items():
                c[key][k] = v
        else:
            c[key] = value
    return c


def validate(c: mlc.ConfigDict, num_devices: int | None = None) -> None:
    """Refuse a bad config before any work starts, naming every bad key (shared rules, then the recipe's).

    `num_devices`: the devices the mesh is built from (default: this process's; `aurora_jax.aot`: a topology's)."""
    errors: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    try:
        recipe = recipe_module(c.get("recipe", "blip"))
    except ValueError as e:
        raise ValueError(f"bad config:\n  {e}") from None
    check(c.compute_dtype in ("float32", "bfloat16"), f"compute_dtype={c.compute_dtype!r}: 'float32' or 'bfloat16'")
    if c.get("adapter_init"):
        check(os.path.isfile(os.path.join(c.adapter_init, "aurora_adapter.json")),
              f"adapter_init={c.adapter_init!r} is not an adapter folder (no aurora_adapter.json)")
    o = c.optim
    check(o.lr > 0 and math.isfinite(o.lr), f"optim.lr={o.lr} must be positive and finite")
    check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    check(o.epochs > 0, f"optim.epochs={o.epochs} must be positive")
    check(o.batch_size > 0, f"optim.batch_size={o.batch_size} must be positive")
    check(o.grad_accum >= 1, f"optim.grad_accum={o.grad_accum} must be >= 1")
    check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    check(0.0 <= o.warmup_ratio < 1.0, f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    check(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}: choose from {SCHEDULES}")
    check(o.clip_norm >= 0, f"optim.clip_norm={o.clip_norm} must be >= 0")
    check(c.eval.batch_size > 0, f"eval.batch_size={c.eval.batch_size} must be positive")
    check(c.eval.every_epochs >= 1, f"eval.every_epochs={c.eval.every_epochs} must be >= 1")
    check(c.checkpoint.every_steps >= 1, f"checkpoint.every_steps={c.checkpoint.every_steps} must be >= 1")
    check(c.checkpoint.keep >= 1, f"checkpoint.keep={c.checkpoint.keep} must be >= 1 (0 would delete every "
          "checkpoint, the trained adapter with them)")
    check(c.log_every >= 1, f"log_every={c.log_every} must be >= 1")
    check(c.max_nonfinite_steps >= 1, f"max_nonfinite_steps={c.max_nonfinite_steps} must be >= 1")
    mesh = tuple(c.mesh)
    check(len(mesh) == 3, f"mesh={mesh} needs 3 entries {MESH_AXES}")
    if len(mesh) == 3:
        errors += _mesh_errors(mesh, c.optim.batch_size, c.eval.batch_size, num_devices or jax.device_count())
    try:
        sharding_rules(c)
    except ValueError as e:
        errors.append(str(e))
    errors += recipe.validate(c)
    if errors:
        raise ValueError("bad config:\n  " + "\n  ".join(errors))


def _mesh_errors(mesh: tuple[int, ...], batch_size: int, eval_batch_size: int, num_devices: int) -> list[str]:
    """Mesh sizes against the devices, and the global batches against the data-parallel size (data x fsdp)."""
    try:
        data, fsdp, _ = mesh_shape(mesh, num_devices)
    except ValueError as e:
        return [f"mesh={mesh}: {e}"]
    dp = data * fsdp
    return [f"{key}={b} is not a multiple of the data-parallel size {dp} (mesh data x fsdp = {data} x {fsdp})"
            for key, b in (("optim.batch_size", batch_size), ("eval.batch_size", eval_batch_size)) if b % dp]


def data_parallel_size(c: mlc.ConfigDict, num_devices: int | None = None) -> int:
    """Shards of the global batch (mesh data x fsdp): the release's GPUs, for its per-GPU pools."""
    data, fsdp, _ = mesh_shape(tuple(c.mesh), num_devices or jax.device_count())
    return data * fsdp


def sharding_rules(c: mlc.ConfigDict) -> tuple:
    """config.sharding_rules in front of the default table (first match wins); the batch rule is fixed."""
    extra = tuple((str(name), None if axes is None else (axes if isinstance(axes, str) else tuple(axes)))
                  for name, axes in tuple(c.sharding_rules))
    for name, axes in extra:
        names = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
        if not set(names) <= set(MESH_AXES):
            raise ValueError(f"sharding_rules: {name!r} -> {axes!r} names a mesh axis outside {list(MESH_AXES)}")
        if name == "batch":
            raise ValueError("sharding_rules: the 'batch' rule is fixed to (data, fsdp) (train.state.global_batch)")
    return extra + DEFAULT_RULES
