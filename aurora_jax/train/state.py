"""Train state and the sharded, jitted train step (what trains is only the small `trainable` tree)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import optax

from aurora_jax.peft import PeftConfig
from aurora_jax.peft.hooks import tuned_forward
from aurora_jax.peft.partition import combine

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    step: Array
    trainable: Any  # {'adapter': ..., 'base': trained base leaves (heads)}
    opt_state: Any
    rng: Array


def make_train_step(
    model, peft_cfg: PeftConfig, tx: optax.GradientTransformation, task_loss: Callable
) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict]]:
    """step(state, frozen, batch) -> (state, metrics); only `state.trainable` is differentiated.

    `task_loss(fwd, batch, rng, base_params)` -> (loss, metrics), with `fwd(method, *args)` the tuned model.
    """

    def step(state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        drop_key, task_key = jax.random.split(key)

        def loss_fn(trainable):
            base, adapter = combine(trainable, frozen)
            fwd = tuned_forward(model, base, adapter, peft_cfg, rng=drop_key, deterministic=False)
            return task_loss(fwd, batch, task_key, base)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    return step
