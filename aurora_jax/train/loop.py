"""The training loop: model + adapter on a mesh, grain data, sharded jitted steps, orbax checkpoints.

`train(config, workdir)` runs one experiment end to end: it resumes from the newest checkpoint in
`workdir`, evaluates before and after tuning, logs metrics (JSONL, TensorBoard, PNG) and saves on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import NamedSharding

from aurora_jax.models import layers
from aurora_jax.models.blip import Blip, BlipConfig, abstract_params, init_params, preset_config, with_dtype
from aurora_jax.parallel.mesh import batch_sharding, make_mesh, param_shardings, replicated
from aurora_jax.peft import PeftConfig, informative_context, init_adapter, partition, trainable_summary
from aurora_jax.tasks.caption import caption_train_loss
from aurora_jax.tasks.retrieval import retrieval_loss, retrieval_loss_distilled
from aurora_jax.tasks.vqa import vqa_train_loss
from aurora_jax.train import evaluate
from aurora_jax.train.checkpoint import Checkpointer
from aurora_jax.train.config import validate
from aurora_jax.train.data import TaskData, build_task_data
from aurora_jax.train.metrics_log import MetricsLogger, plot_metrics
from aurora_jax.train.momentum import alpha_ramp, init_momentum, init_queues, queues_from_checkpoint
from aurora_jax.train.optim import learning_rate_schedule, make_optimizer
from aurora_jax.train.state import TrainState, make_train_step

log = logging.getLogger("aurora_jax")


# ---------------------------------------------------------------------------------------------- model


def load_base_model(config: mlc.ConfigDict, tokenizer: Any) -> tuple[BlipConfig, dict]:
    """The frozen backbone: a converted checkpoint directory, or a random init of a preset size."""
    if config.model.init:
        from aurora_jax.convert.store import load_converted

        cfg, params = load_converted(config.model.init)
        if cfg.task != config.task:
            cfg, params = _switch_task(cfg, params, config.task)
    else:
        ids = token_ids(tokenizer)
        cfg = preset_config(config.model.size, task=config.task, vocab_size=len(tokenizer),
                            image_size=config.model.image_size, **ids)
        params = layers.lecun_random_params(abstract_params(cfg), config.seed)
        if "temp" in params:  # a scalar hyper-parameter, not a weight: BLIP's initial ITC temperature
            params["temp"] = np.asarray(cfg.temp, np.float32)
    if cfg.vision.image_size != config.model.image_size:
        raise ValueError(f"model.image_size={config.model.image_size} but the checkpoint was converted for "
                         f"{cfg.vision.image_size} px: re-convert with --image-size")
    if config.model.remat:
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, remat=True),
                          text=dataclasses.replace(cfg.text, remat=True))
    return cfg, params


def _switch_task(cfg: BlipConfig, params: dict, task: str) -> tuple[BlipConfig, dict]:
    """Reuse a checkpoint of another BLIP task: shared parts are kept, missing heads start random."""
    new_cfg = cfg.replace(task=task)
    fresh = init_params(new_cfg, jax.random.key(0))
    missing = [k for k in fresh if k not in params]
    log.warning("checkpoint task %r != %r: initialising %s at random", cfg.task, task, missing)
    return new_cfg, {k: params.get(k, v) for k, v in fresh.items()}


def token_ids(tokenizer: Any) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "enc_token_id": tokenizer.enc_token_id,
            "sep_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}


def make_tokenizer(config: mlc.ConfigDict, workdir: str) -> Any:
    from aurora_jax.data.text import load_blip_tokenizer, write_word_vocab

    if config.model.init and any(os.path.exists(os.path.join(config.model.init, f))
                                 for f in ("vocab.txt", "tokenizer.json")):
        return load_blip_tokenizer(config.model.init)
    if config.data.name != "shapes":
        raise ValueError("a tokenizer (vocab.txt) must come with model.init for real data sets")
    from aurora_jax.data import shapes

    folder = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(folder, "vocab.txt")):
        write_word_vocab(shapes.vocabulary(), folder)
    return load_blip_tokenizer(folder)


# ---------------------------------------------------------------------------------------------- task


def task_loss_fn(config: mlc.ConfigDict, cfg: BlipConfig, peft_cfg: PeftConfig, *, steps_per_epoch: int = 1):
    """loss(fwd, batch, rng, base_params) for the configured task (+ teacher with momentum distillation).

    `steps_per_epoch` (train-step calls per epoch) sets the ramp of the distillation weight.
    """
    if config.task == "retrieval":
        ice = partial(informative_context, weight=peft_cfg.ice_weight) if (
            peft_cfg.method == "aurora" and peft_cfg.ice) else None
        # Momentum distillation (BLIP): alpha ramped over the first epoch.
        if uses_momentum(config):
            alpha = config.momentum.alpha

            def loss(fwd, batch, rng, base, teacher):
                return retrieval_loss_distilled(
                    fwd, teacher.fwd, batch, rng, teacher.queues, temp=base["temp"], enc_token_id=cfg.enc_token_id,
                    ice=ice, alpha=alpha_ramp(alpha, teacher.step, steps_per_epoch))
            return loss

        def loss(fwd, batch, rng, base):
            return retrieval_loss(fwd, batch, rng, temp=base["temp"], enc_token_id=cfg.enc_token_id, ice=ice)
    elif config.task == "vqa":
        def loss(fwd, batch, rng, base):
            return vqa_train_loss(fwd, batch, rng, enc_token_id=cfg.enc_token_id)
    else:
        def loss(fwd, batch, rng, base):
            return caption_train_loss(fwd, batch, rng, bos_token_id=cfg.bos_token_id,
                                      prompt_len=config.data.get("prompt_len", 1))
    return loss


# ---------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Run:
    """Everything a run holds: model, frozen/trainable trees on the mesh, data, step functions."""

    config: mlc.ConfigDict
    workdir: str
    cfg: BlipConfig
    model: Blip
    peft_cfg: PeftConfig
    mesh: Any
    frozen: Any
    state: TrainState
    data: TaskData
    step_fn: Any
    steps_per_epoch: int
    total_steps: int
    summary: dict


def setup(config: mlc.ConfigDict, workdir: str) -> Run:
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(config, workdir)
    cfg, base = load_base_model(config, tokenizer)
    compute = config.compute_dtype
    cfg = with_dtype(cfg, compute)
    model = Blip(cfg)
    peft_cfg = PeftConfig.from_dict(config.peft)
    mesh = make_mesh(tuple(config.mesh))

    data = build_task_data(config, tokenizer, workdir)
    steps_per_epoch = max(1, data.steps_per_epoch // config.optim.grad_accum)
    total = steps_per_epoch * config.optim.epochs
    schedule = learning_rate_schedule(config.optim.lr, steps_per_epoch=steps_per_epoch,
                                      epochs=config.optim.epochs, schedule=config.optim.schedule,
                                      warmup_steps=config.optim.warmup_steps)
    tx = make_optimizer(schedule, weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip_norm,
                        grad_accum=config.optim.grad_accum)
    state, frozen, shardings = init_train_state(cfg, base, peft_cfg, tx, mesh, seed=config.seed,
                                                frozen_dtype=compute, **momentum_options(config))
    task_loss = task_loss_fn(config, cfg, peft_cfg, steps_per_epoch=data.steps_per_epoch)
    step_fn = jit_train_step(make_train_step(model, peft_cfg, tx, task_loss, ema=config.momentum.ema,
                                             ema_every=config.optim.grad_accum), mesh, *shardings)
    trainable = state.trainable
    summary = trainable_summary(trainable, frozen)
    return Run(config, workdir, cfg, model, peft_cfg, mesh, frozen, state, data, step_fn, steps_per_epoch,
               total * config.optim.grad_accum, summary)


def uses_momentum(config: mlc.ConfigDict) -> bool:
    """Momentum distillation is BLIP's retrieval recipe only."""
    return config.task == "retrieval" and bool(config.momentum.enabled)


def momentum_options(config: mlc.ConfigDict) -> dict[str, Any]:
    """init_train_state's momentum keywords: queue size and the converted checkpoint's `*_m` copies/queues."""
    if not uses_momentum(config):
        return {}
    extras = None
    if config.model.init:
        from aurora_jax.convert.store import load_converted_extras

        extras = load_converted_extras(config.model.init)
    return {"momentum": True, "queue_size": int(config.momentum.get("queue_size", 57600)), "momentum_init": extras}


def place_trainable(
    base: dict, peft_cfg: PeftConfig, tx, mesh, base_sh: dict, *, seed: int, frozen_dtype: str = "float32"
) -> tuple[TrainState, Any, Any, Any]:
    """Adapter + partition on the mesh -> (state, frozen, frozen shardings, trainable shardings).

    Frozen leaves keep the base's logical-axis shardings (bf16 when computing in bf16); what trains is
    float32 (base leaves sharded like the base, the small adapter replicated). Call `finish_state` last.
    """
    adapter = init_adapter(base, peft_cfg, jax.random.key(seed + 1))
    trainable, frozen = partition(base, adapter, peft_cfg)
    if frozen_dtype == "bfloat16":
        frozen = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, frozen)
    frozen_sh = subtree_like(base_sh, frozen)
    trainable_sh = {"adapter": jax.tree_util.tree_map(lambda _: replicated(mesh), trainable["adapter"]),
                    "base": subtree_like(base_sh, trainable["base"])}
    frozen = jax.device_put(frozen, frozen_sh)
    # A float32 copy: the step donates the state, which must not free the caller's base arrays.
    trainable = jax.tree_util.tree_map(
        lambda x: jnp.array(x, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), trainable)
    trainable = jax.device_put(trainable, trainable_sh)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=jax.jit(tx.init)(trainable),
                       rng=jax.random.key_data(jax.random.key(seed + 2)))
    return state, frozen, frozen_sh, trainable_sh


def finish_state(state: TrainState, mesh) -> tuple[TrainState, Any]:
    """Replicate the scalars (step, rng, optimizer counts); parameter-shaped leaves keep their shardings."""
    state_sh = jax.tree_util.tree_map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        else replicated(mesh), state)
    return jax.device_put(state, state_sh), state_sh


def init_train_state(
    cfg: BlipConfig, base: dict, peft_cfg: PeftConfig, tx, mesh, *, seed: int, frozen_dtype: str = "float32",
    momentum: bool = False, queue_size: int = 57600, momentum_init: dict | None = None,
) -> tuple[TrainState, Any, tuple[Any, Any]]:
    """BLIP's train state on the mesh -> (state, frozen, (state shardings, frozen shardings)).

    momentum=True adds BLIP's momentum model (EMA of what trains) and feature queues of `queue_size`;
    `momentum_init` = converted extras {'momentum': `*_m` copies, 'queues': buffers}, when the checkpoint has them.
    """
    boxed = abstract_params(cfg, boxed=True)
    base_sh = param_shardings(layers.unbox(boxed), layers.logical_axes(boxed), mesh)
    state, frozen, frozen_sh, trainable_sh = place_trainable(base, peft_cfg, tx, mesh, base_sh, seed=seed,
                                                             frozen_dtype=frozen_dtype)
    # BLIP's momentum model is sharded like what it copies; the feature queues are replicated.
    if momentum:
        init = momentum_init or {}
        mom = init_momentum(state.trainable, frozen, init.get("momentum"))
        mom_sh = {"trainable": trainable_sh}
        if "frozen" in mom:
            mom_sh["frozen"] = subtree_like(base_sh, mom["frozen"])
        queue_key = jax.random.key(seed + 3)
        queues = (queues_from_checkpoint(init["queues"], queue_size, cfg.embed_dim, queue_key) if init.get("queues")
                  else init_queues(queue_key, queue_size, cfg.embed_dim))
        state = state.replace(momentum=jax.device_put(mom, mom_sh), queues=queues)
    state, state_sh = finish_state(state, mesh)
    return state, frozen, (state_sh, frozen_sh)


def jit_train_step(step, mesh, state_sh, frozen_sh):
    """The step jitted over the mesh: state donated, batch split over the data-parallel axes."""
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sharding(mesh)),
                   out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,))


def subtree_like(full: dict, part: dict) -> dict:
    """The entries of `full` at the paths present in `part`."""
    return {k: subtree_like(full[k], v) if isinstance(v, dict) else full[k] for k, v in part.items()}


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays split over the data-parallel axes."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- loop


class Preempted:
    """Remembers a SIGTERM so the loop can save a checkpoint and leave cleanly."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def run_eval(run: Run, state: TrainState) -> dict[str, float]:
    return evaluate.evaluate(run.config, run.model, run.cfg, run.peft_cfg, state.trainable, run.frozen,
                             run.data, run.mesh)


def train(config: mlc.ConfigDict, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate; returns {'before': eval metrics, 'after': eval metrics, 'summary': params, 'run'}."""
    run = setup(config, workdir)
    return fit(run, config, workdir, evaluate=lambda state: run_eval(run, state),
               steps_per_epoch=run.steps_per_epoch * config.optim.grad_accum,
               desc=f"{config.task}/{config.peft.method}", progress=progress)


def fit(
    run: Any, config: mlc.ConfigDict, workdir: str, *, evaluate: Callable[[TrainState], dict], steps_per_epoch: int,
    desc: str, progress: bool = True, finalize: Callable[[dict, TrainState], None] | None = None,
) -> dict[str, Any]:
    """The loop every trainer shares: resume from the newest checkpoint, evaluate before, step with logging,
    checkpoints and SIGTERM handling, evaluate after, write results/curves.

    `run` has state, frozen, mesh, step_fn, data.train, total_steps and summary (BLIP's or Owl's Run).
    """
    from tqdm import tqdm

    run_dir = os.path.abspath(workdir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=config.checkpoint.keep)
    logger = MetricsLogger(run_dir)
    results_path = os.path.join(run_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    results["summary"] = run.summary
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{run.summary['trainable']:,}",
             f"{run.summary['total']:,}", run.summary["percent"])
    state, train_iter, start = run.state, iter(run.data.train), 0
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(latest, state)
        if data_state is not None:
            train_iter.set_state(data_state)
        start = int(latest)
        log.info("resumed from step %d", start)
    total = run.total_steps if config.max_steps < 0 else min(run.total_steps, config.max_steps)
    if start == 0 and config.eval.at_start and "before" not in results:
        results["before"] = evaluate(state)
        logger.log(0, "eval", results["before"])
        write_json(results_path, results)

    bar = tqdm(total=total, initial=start, disable=not progress, desc=desc, dynamic_ncols=True)
    t0, seen, window, step = time.perf_counter(), 0, [], start
    with Preempted() as preempted:
        while step < total:
            state, metrics = run.step_fn(state, run.frozen, global_batch(next(train_iter), run.mesh))
            step += 1
            seen += config.optim.batch_size
            window.append(metrics)
            if step % config.log_every == 0 or step == total:
                m = {k: float(np.mean([float(w[k]) for w in window])) for k in window[0]}
                m["examples_per_s"] = seen / (time.perf_counter() - t0)
                logger.log(step, "train", m)
                bar.set_postfix(loss=f"{m['loss']:.4f}", ex_s=f"{m['examples_per_s']:.1f}")
                window = []
            bar.update(1)
            if step % config.checkpoint.every_steps == 0 or preempted.flag or step == total:
                ckpt.save(step, state, train_iter.get_state(), force=True)
            if preempted.flag:
                log.warning("SIGTERM: saved step %d, exiting", step)
                ckpt.close()
                bar.close()
                raise SystemExit(143)
            epoch_done = step % steps_per_epoch == 0
            if epoch_done and step < total and (step // steps_per_epoch) % config.eval.every_epochs == 0:
                logger.log(step, "eval", evaluate(state))
    bar.close()
    ckpt.close()
    results["after"] = evaluate(state)
    results["steps"] = step
    logger.log(step, "eval", results["after"])
    logger.close()
    if finalize is not None:
        finalize(results, state)
    write_json(results_path, results)
    plot_metrics(logger.path, os.path.join(run_dir, "curves.png"))
    run.state = state
    results["run"] = run
    return results


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in obj.items() if k != "run"}, f, indent=2)
    os.replace(tmp, path)
