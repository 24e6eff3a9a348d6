"""Train state, the train step, placement on the mesh, jit with shardings and global batches.

What trains is only the `trainable` tree; the frozen base is an argument of the step, never donated.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from aurora_jax.models import layers
from aurora_jax.parallel.mesh import batch_sharding, param_shardings, replicated
from aurora_jax.peft import PeftConfig, init_adapter, partition
from aurora_jax.peft.hooks import tuned_forward
from aurora_jax.peft.partition import combine
from aurora_jax.tasks.momentum import Teacher, momentum_params, update_momentum

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array
    trainable: Any  # {'adapter': ..., 'base': trained base leaves (heads)}
    opt_state: Any
    rng: Array
    momentum: Any = None  # momentum distillation: EMA model (train.momentum.init_momentum), or None
    queues: Any = None  # momentum distillation: feature queues (train.momentum.init_queues), or None


def make_train_step(
    model, peft_cfg: PeftConfig, tx: optax.GradientTransformation, task_loss: Callable, *,
    ema: float = 0.995, ema_every: int = 1, teacher_dropout: bool = True,
) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict]]:
    """step(state, frozen, batch) -> (state, metrics); only `state.trainable` is differentiated.

    `task_loss(fwd, batch, rng, base_params)` -> (loss, metrics), with `fwd(method, *args)` the tuned model.
    A step with a non-finite loss, gradient or update leaves the state unchanged but for `step`, and reports
    `nonfinite` = 1 in its metrics. When the state carries a momentum model, the step first moves it towards
    the online model (BLIP's order: EMA, then the forward pass) and calls
    `task_loss(fwd, batch, rng, base_params, teacher)` -> (loss, (metrics, queues)) instead, keeping the queues
    it returns. `ema_every` = gradient-accumulation steps, so the EMA follows optimizer updates rather than
    micro-batches. `teacher_dropout`: the momentum model runs in train mode (adapter, BERT dropout and drop path
    active, with masks of its own), as the release's momentum encoders do; False makes it deterministic.
    """

    def step(state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        drop_key, task_key = jax.random.split(key)

        if state.momentum is None:
            def loss_fn(trainable):
                base, adapter = combine(trainable, frozen)
                fwd = tuned_forward(model, base, adapter, peft_cfg, rng=drop_key, deterministic=False)
                return task_loss(fwd, batch, task_key, base)

            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
            extra = {}
        else:
            momentum = _momentum_step(state, frozen, ema, ema_every)
            base_m, adapter_m = momentum_params(momentum, frozen, state.trainable)
            teacher_fwd = tuned_forward(model, base_m, adapter_m, peft_cfg, rng=jax.random.fold_in(drop_key, 1),
                                        deterministic=not teacher_dropout)
            teacher = Teacher(fwd=teacher_fwd, queues=state.queues, step=state.step)

            def loss_fn(trainable):
                base, adapter = combine(trainable, frozen)
                fwd = tuned_forward(model, base, adapter, peft_cfg, rng=drop_key, deterministic=False)
                return task_loss(fwd, batch, task_key, base, teacher)

            (loss, (metrics, queues)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
            extra = {"momentum": momentum, "queues": queues}
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        grad_norm = optax.global_norm(grads)
        # The non-finite guard: a step whose loss, gradients or resulting weights are not finite changes nothing
        # (weights, optimizer, momentum, queues); it is counted, and the loop stops after too many in a row.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(trainable))
        new = state.replace(trainable=trainable, opt_state=opt_state, **extra)
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = dict(metrics, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
        return state.replace(step=state.step + 1), metrics

    return step


def _momentum_step(state: TrainState, frozen: Any, ema: float, ema_every: int) -> Any:
    """The EMA of the momentum model, applied on the first micro-batch after each optimizer update."""
    new = update_momentum(state.momentum, state.trainable, frozen, ema)
    if ema_every == 1:
        return new
    due = state.step % ema_every == 0
    return jax.tree_util.tree_map(lambda a, b: jnp.where(due, a, b), new, state.momentum)


# ------------------------------------------------------------------------------------------ placement


def base_shardings(boxed_abstract: dict, mesh, rules: tuple | None = None) -> dict:
    """NamedShardings of every base leaf from the logical axes the model declares (`abstract_params(boxed=True)`)."""
    kw = {} if rules is None else {"rules": rules}
    return param_shardings(layers.unbox(boxed_abstract), layers.logical_axes(boxed_abstract), mesh, **kw)


def split_base(base: dict, peft_cfg: PeftConfig, *, seed: int, frozen_dtype: str = "float32",
               adapter: dict | None = None) -> tuple[Any, Any]:
    """(trainable, frozen) before placement: a fresh adapter (or `adapter`, a saved one to start from) + the trained
    base leaves in float32, the frozen rest (bf16 when computing in bf16). Pure, so `jax.eval_shape` gives its
    abstract form (`abstract_state`)."""
    if adapter is None:
        adapter = init_adapter(base, peft_cfg, jax.random.key(seed + 1))
    trainable, frozen = partition(base, adapter, peft_cfg)
    if frozen_dtype == "bfloat16":
        frozen = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, frozen)
    # A float32 copy: the step donates the state, which must not free the caller's base arrays.
    trainable = jax.tree_util.tree_map(
        lambda x: jnp.array(x, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), trainable)
    return trainable, frozen


def split_shardings(base_sh: dict, trainable: Any, frozen: Any, mesh) -> tuple[Any, Any]:
    """(frozen shardings, trainable shardings): the base's logical-axis shardings, the small adapter replicated."""
    frozen_sh = subtree_like(base_sh, frozen)
    trainable_sh = {"adapter": jax.tree_util.tree_map(lambda _: replicated(mesh), trainable["adapter"]),
                    "base": subtree_like(base_sh, trainable["base"])}
    return frozen_sh, trainable_sh


def initial_rng(seed: int) -> Array:
    return jax.random.key_data(jax.random.key(seed + 2))


def place_trainable(
    base: dict, peft_cfg: PeftConfig, tx, mesh, base_sh: dict, *, seed: int, frozen_dtype: str = "float32",
    adapter: dict | None = None,
) -> tuple[TrainState, Any, Any, Any]:
    """Adapter + partition on the mesh -> (state, frozen, frozen shardings, trainable shardings).

    Frozen leaves keep the base's logical-axis shardings (bf16 when computing in bf16); what trains is
    float32 (base leaves sharded like the base, the small adapter replicated). Call `finish_state` last.
    """
    trainable, frozen = split_base(base, peft_cfg, seed=seed, frozen_dtype=frozen_dtype, adapter=adapter)
    frozen_sh, trainable_sh = split_shardings(base_sh, trainable, frozen, mesh)
    frozen = jax.device_put(frozen, frozen_sh)
    trainable = jax.device_put(trainable, trainable_sh)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=jax.jit(tx.init)(trainable),
                       rng=initial_rng(seed))
    return state, frozen, frozen_sh, trainable_sh


def state_shardings(state: Any, mesh) -> Any:
    """Parameter-shaped leaves keep their shardings on `mesh`; the scalars (step, rng, optimizer counts) and
    anything else are replicated. Arrays and ShapeDtypeStructs alike."""
    def one(x):
        sh = getattr(x, "sharding", None)
        return sh if isinstance(sh, NamedSharding) and sh.mesh == mesh else replicated(mesh)

    return jax.tree_util.tree_map(one, state)


def finish_state(state: TrainState, mesh) -> tuple[TrainState, Any]:
    """Replicate the scalars (step, rng, optimizer counts); parameter-shaped leaves keep their shardings."""
    state_sh = state_shardings(state, mesh)
    return jax.device_put(state, state_sh), state_sh


def init_state(
    base: dict, peft_cfg: PeftConfig, tx, mesh, base_sh: dict, *, seed: int, frozen_dtype: str = "float32",
    extend: Callable[[TrainState, Any], TrainState] | None = None, adapter: dict | None = None,
) -> tuple[TrainState, Any, tuple[Any, Any]]:
    """The train state on the mesh -> (state, frozen, (state shardings, frozen shardings)).

    `extend(state, frozen)` adds recipe state (BLIP's momentum model) before the scalars are replicated;
    `adapter` starts the adapter from saved values instead of a fresh init.
    """
    state, frozen, frozen_sh, _ = place_trainable(base, peft_cfg, tx, mesh, base_sh, seed=seed,
                                                  frozen_dtype=frozen_dtype, adapter=adapter)
    if extend is not None:
        state = extend(state, frozen)
    state, state_sh = finish_state(state, mesh)
    return state, frozen, (state_sh, frozen_sh)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (one per leaf)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_state(
    base: dict, peft_cfg: PeftConfig, tx, mesh, base_sh: dict, *, seed: int, frozen_dtype: str = "float32",
    extend: Callable[[TrainState, Any], TrainState] | None = None,
) -> tuple[TrainState, Any, tuple[Any, Any]]:
    """What `init_state` returns, as ShapeDtypeStructs with shardings, allocating nothing (ahead-of-time compiles).

    `base` may be abstract (`recipe.abstract_params`). The optimizer state's shardings are those `jax.jit(tx.init)`
    compiles to, as in `place_trainable`; `extend(state, frozen)` works on ShapeDtypeStructs.
    """
    trainable, frozen = jax.eval_shape(partial(split_base, peft_cfg=peft_cfg, seed=seed, frozen_dtype=frozen_dtype),
                                       base)
    frozen_sh, trainable_sh = split_shardings(base_sh, trainable, frozen, mesh)
    trainable, frozen = with_shardings(trainable, trainable_sh), with_shardings(frozen, frozen_sh)
    init = jax.jit(tx.init).lower(trainable)
    opt_sh = init.compile().output_shardings
    opt_state = with_shardings(init.out_info, opt_sh)
    rng = jax.eval_shape(partial(initial_rng, seed))
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable, opt_state=opt_state, rng=rng)
    if extend is not None:
        state = extend(state, frozen)
    state_sh = state_shardings(state, mesh)
    return with_shardings(state, state_sh), frozen, (state_sh, frozen_sh)


def on_mesh(fn: Callable, mesh) -> Callable:
    """`fn` tracing with `mesh` visible to the kernels that partition themselves (`layers.kernel_mesh`)."""
    def traced(*args):
        with layers.kernel_mesh(mesh):
            return fn(*args)

    return traced


def jit_train_step(step, mesh, state_sh, frozen_sh):
    """The step jitted over the mesh: state donated, batch split over the data-parallel axes."""
    return jax.jit(on_mesh(step, mesh), in_shardings=(state_sh, frozen_sh, batch_sharding(mesh)),
                   out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))


def subtree_like(full: dict, part: dict) -> dict:
    """The entries of `full` at the paths present in `part`."""
    return {k: subtree_like(full[k], v) if isinstance(v, dict) else full[k] for k, v in part.items()}


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays split over the data-parallel axes."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}
