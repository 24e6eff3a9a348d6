"""Train state and the sharded, jitted train step (what trains is only the small `trainable` tree)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from aurora_jax.peft import PeftConfig
from aurora_jax.peft.hooks import tuned_forward
from aurora_jax.peft.partition import combine
from aurora_jax.train.momentum import Teacher, momentum_params, update_momentum

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
    ema: float = 0.995, ema_every: int = 1,
) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict]]:
    """step(state, frozen, batch) -> (state, metrics); only `state.trainable` is differentiated.

    `task_loss(fwd, batch, rng, base_params)` -> (loss, metrics), with `fwd(method, *args)` the tuned model.
    When the state carries a momentum model, the step first moves it towards the online model (BLIP's order:
    EMA, then the forward pass) and calls `task_loss(fwd, batch, rng, base_params, teacher)` ->
    (loss, (metrics, queues)) instead, keeping the queues it returns. `ema_every` = gradient-accumulation steps,
    so the EMA follows optimizer updates rather than micro-batches.
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
            base_m, adapter_m = momentum_params(momentum, frozen)
            teacher = Teacher(fwd=tuned_forward(model, base_m, adapter_m, peft_cfg, deterministic=True),
                              queues=state.queues, step=state.step)

            def loss_fn(trainable):
                base, adapter = combine(trainable, frozen)
                fwd = tuned_forward(model, base, adapter, peft_cfg, rng=drop_key, deterministic=False)
                return task_loss(fwd, batch, task_key, base, teacher)

            (loss, (metrics, queues)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
            extra = {"momentum": momentum, "queues": queues}
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, **extra), metrics

    return step


def _momentum_step(state: TrainState, frozen: Any, ema: float, ema_every: int) -> Any:
    """The EMA of the momentum model, applied on the first micro-batch after each optimizer update."""
    new = update_momentum(state.momentum, state.trainable, frozen, ema)
    if ema_every == 1:
        return new
    due = state.step % ema_every == 0
    return jax.tree_util.tree_map(lambda a, b: jnp.where(due, a, b), new, state.momentum)
