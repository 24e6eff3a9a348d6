"""The family-free engine: assemble a run from its recipe, then `fit` it (resume, evaluate, step, checkpoint,
SIGTERM, results).

`train(config, workdir)` runs one experiment end to end: it resumes from the newest checkpoint in
`workdir`, evaluates before and after tuning, logs metrics (JSONL, TensorBoard, PNG) and saves on SIGTERM.
What differs between model families (BLIP, mPLUG-Owl) is the recipe named by `config.recipe`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from tqdm import tqdm

from aurora_jax.models.stack import match_layout, with_scan
from aurora_jax.parallel.distributed import is_primary, primary_first, sync
from aurora_jax.parallel.mesh import make_mesh
from aurora_jax.peft import PeftConfig, combine, trainable_summary
from aurora_jax.peft.store import start_from_adapter
from aurora_jax.train.checkpoint import Checkpointer
from aurora_jax.train.config import recipe_module, sharding_rules, validate
from aurora_jax.train.export import export_merged
from aurora_jax.train.metrics_log import MetricsLogger, plot_metrics
from aurora_jax.train.optim import learning_rate_schedule, make_optimizer
from aurora_jax.train.state import (
    TrainState,
    base_shardings,
    global_batch,
    init_state,
    jit_train_step,
    make_train_step,
)
from aurora_jax.train.workdir import WorkdirLock, check_base_identity

log = logging.getLogger("aurora_jax")


@dataclasses.dataclass
class Run:
    """Everything a run holds: model, frozen/trainable trees on the mesh, data, the jitted step."""

    config: mlc.ConfigDict
    workdir: str
    recipe: Any
    base_cfg: Any  # the model config as loaded (float32, no remat): what exports write
    cfg: Any  # the model config computing as the run asks (dtype, remat)
    model: Any
    peft_cfg: PeftConfig
    tokenizer: Any
    mesh: Any
    frozen: Any
    state: TrainState
    data: Any
    step_fn: Any
    steps_per_epoch: int  # micro-steps
    total_steps: int  # micro-steps
    summary: dict
    cache: dict = dataclasses.field(default_factory=dict)  # the recipe's jitted evaluation helpers


def optimizer_for(config: mlc.ConfigDict, steps_per_epoch: int):
    """AdamW with the configured schedule; `steps_per_epoch` counts optimizer updates."""
    o = config.optim
    warmup = math.ceil(o.warmup_ratio * steps_per_epoch * o.epochs) if o.warmup_ratio > 0 else o.warmup_steps
    schedule = learning_rate_schedule(o.lr, steps_per_epoch=steps_per_epoch, epochs=o.epochs, schedule=o.schedule,
                                      warmup_steps=warmup)
    return make_optimizer(schedule, weight_decay=o.weight_decay, clip_norm=o.clip_norm, grad_accum=o.grad_accum)


def setup(config: mlc.ConfigDict, workdir: str) -> Run:
    """Validate, then build tokenizer, mesh, base model, data, adapter, state and the jitted step."""
    validate(config)
    recipe = recipe_module(config.recipe)
    os.makedirs(workdir, exist_ok=True)
    with primary_first("tokenizer"):  # it may write a vocabulary into the workdir
        tokenizer = recipe.tokenizer(config, workdir)
    mesh = make_mesh(tuple(config.mesh))
    shardings_for = base_shardings_for(config, recipe, mesh)
    base_cfg, base = recipe.load_base(config, tokenizer, workdir, shardings_for)
    require_finite_params(base, config.get("model", {}).get("init", "") or "the random init")
    base_cfg, base = in_run_layout(config, recipe, base_cfg, base)
    cfg = recipe.with_compute(base_cfg, config)
    peft_cfg = recipe.peft_config(config)
    with primary_first("data"):  # process 0 builds the tfds records, the others then read them
        data = recipe.data(config, tokenizer, cfg, workdir)

    accum = config.optim.grad_accum
    opt_steps = max(1, data.steps_per_epoch // accum)
    tx = optimizer_for(config, opt_steps)
    base_sh = shardings_for(base_cfg)
    adapter = None
    if config.get("adapter_init"):
        base, adapter = start_from_adapter(config.adapter_init, base, peft_cfg)
    state, frozen, (state_sh, frozen_sh) = init_state(
        base, peft_cfg, tx, mesh, base_sh, seed=config.seed, frozen_dtype=config.compute_dtype, adapter=adapter,
        extend=lambda state, frozen: recipe.extend_state(config, base_cfg, state, frozen, base_sh, mesh))
    del base
    model, step = train_step_for(config, recipe, cfg, peft_cfg, tx, data)
    step_fn = jit_train_step(step, mesh, state_sh, frozen_sh)
    return Run(config, workdir, recipe, base_cfg, cfg, model, peft_cfg, tokenizer, mesh, frozen, state, data, step_fn,
               opt_steps * accum, opt_steps * accum * config.optim.epochs, trainable_summary(state.trainable, frozen))


def in_run_layout(config: mlc.ConfigDict, recipe: Any, base_cfg: Any, base: dict | None = None) -> tuple[Any, Any]:
    """(model config, base params) in the layout the run computes in: blocks scanned with `model.scan_layers`
    (checkpoints on disk are per layer, as the releases)."""
    base_cfg = with_scan(base_cfg, bool(config.model.get("scan_layers", False)))
    return base_cfg, None if base is None else match_layout(base, recipe.abstract_params(base_cfg))


def base_shardings_for(config: mlc.ConfigDict, recipe: Any, mesh) -> Callable[[Any], dict]:
    """model config -> the NamedShardings of its base parameters on `mesh` (the config's logical-axis rules)."""
    rules = sharding_rules(config)
    return lambda cfg: base_shardings(recipe.abstract_params(cfg, boxed=True), mesh, rules)


def train_step_for(config: mlc.ConfigDict, recipe: Any, cfg: Any, peft_cfg: PeftConfig, tx, data: Any):
    """(model, the un-jitted train step) of a run: the recipe's loss inside the engine's step."""
    model = recipe.model(cfg)
    step = make_train_step(model, peft_cfg, tx, recipe.loss(config, cfg, peft_cfg, data),
                           ema_every=config.optim.grad_accum, **recipe.train_step_options(config))
    return model, step


def check_batch(batch: dict, layout: dict) -> None:
    """The data's first batch against the recipe's `batch_layout` (what `aurora_jax.aot` compiles for)."""
    bad = []
    for key in sorted(set(batch) | set(layout)):
        if key not in batch or key not in layout:
            bad.append(f"{key}: {'missing from the batch' if key not in batch else 'not in the layout'}")
            continue
        x, want = np.asarray(batch[key]), layout[key]
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:]) if x.ndim else x.shape
        if shape != tuple(want.shape) or x.dtype != want.dtype:
            bad.append(f"{key}: {x.dtype}{list(shape)} != layout {want.dtype}{list(want.shape)}")
    if bad:
        raise RuntimeError("the training batch does not match the recipe's batch_layout: " + "; ".join(bad))


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


class NonFiniteError(RuntimeError):
    """Training or evaluation produced NaN/Inf where a number was due; nothing non-finite was saved."""


def train(config: mlc.ConfigDict, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate; returns {'before': eval metrics, 'after': eval metrics, 'summary': params, 'run'}.

    The workdir is locked for the run's life; a resume onto another backbone than the checkpoints' is refused.
    """
    validate(config)
    workdir = os.path.abspath(workdir)
    lock = WorkdirLock(workdir) if is_primary() else contextlib.nullcontext()
    with lock:
        check_base_identity(workdir, config, resuming=has_checkpoints(workdir), write=is_primary())
        sync("workdir checked")
        run = setup(config, workdir)

        def finalize(results: dict, state: TrainState) -> None:
            if config.export:
                base, adapter = combine(state.trainable, run.frozen, stop_gradient=False)
                results["export"] = export_merged(run.recipe, run.base_cfg, base, adapter, run.peft_cfg,
                                                  run.tokenizer, os.path.join(workdir, "export"),
                                                  meta={"exported_from": workdir})

        return fit(run, config, workdir, evaluate=lambda state: run.recipe.evaluate(run, state),
                   steps_per_epoch=run.steps_per_epoch, desc=run.recipe.describe(config), progress=progress,
                   finalize=finalize)


def has_checkpoints(workdir: str) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))


def restore_newest_readable(ckpt: Checkpointer, state: TrainState, workdir: str) -> tuple[TrainState, Any, int]:
    """(state, data iterator state, step) from the newest checkpoint that reads; unreadable ones are reported and
    moved to <workdir>/corrupt_checkpoints. Step 0 and the initial state when there is none."""
    for step in reversed(ckpt.all_steps()):
        try:
            restored, data_state = ckpt.restore(step, state)
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many kinds for a damaged step)
            moved = ckpt.quarantine(step, os.path.join(workdir, "corrupt_checkpoints"))
            log.error("checkpoint step %d is unreadable (%s: %s); moved to %s, trying the one before",
                      step, type(e).__name__, str(e).splitlines()[0][:200], moved)
            continue
        return restored, data_state, step
    return state, None, 0


def require_finite_params(params: dict, source: str) -> None:
    """Refuse a backbone with NaN/Inf weights before any work, naming the leaves (at most five)."""
    def finite(x) -> Any:
        x = jnp.asarray(x)  # converted folders may hold Python scalars (e.g. BLIP's temperature)
        return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True

    flags = jax.tree_util.tree_map(finite, params)
    bad = ["/".join(str(getattr(k, "key", k)) for k in kp) for kp, ok in
           jax.tree_util.tree_flatten_with_path(jax.device_get(flags))[0] if not ok]
    if bad:
        raise NonFiniteError(f"{source} has non-finite values (NaN/Inf) in {len(bad)} tensors: {bad[:5]}")


def require_finite(metrics: dict[str, float], what: str) -> dict[str, float]:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(float(v)))
    if bad:
        raise NonFiniteError(f"{what} gave non-finite {bad}: the model is broken (a NaN/Inf in the backbone, or "
                             "a diverged run); results.json was not written")
    return metrics


def fit(
    run: Run, config: mlc.ConfigDict, workdir: str, *, evaluate: Callable[[TrainState], dict], steps_per_epoch: int,
    desc: str, progress: bool = True, finalize: Callable[[dict, TrainState], None] | None = None,
) -> dict[str, Any]:
    """Resume from the newest readable checkpoint, evaluate before, step with logging, checkpoints, the non-finite
    guard and SIGTERM handling, evaluate after, write results/curves. `steps_per_epoch` counts micro-steps."""
    run_dir, primary = os.path.abspath(workdir), is_primary()
    if primary:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=config.checkpoint.keep)
    logger = MetricsLogger(run_dir, enabled=primary)
    results_path = os.path.join(run_dir, "results.json")
    results = read_json(results_path) if os.path.exists(results_path) else {}
    results["summary"] = run.summary
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{run.summary['trainable']:,}",
             f"{run.summary['total']:,}", run.summary["percent"])
    train_iter = iter(run.data.train)
    state, data_state, start = restore_newest_readable(ckpt, run.state, run_dir)
    if data_state is not None:
        train_iter.set_state(data_state)
    if start:
        log.info("resumed from step %d", start)
    total = run.total_steps if config.max_steps < 0 else min(run.total_steps, config.max_steps)
    if start == 0 and config.eval.at_start and "before" not in results:
        results["before"] = require_finite(evaluate(state), "the evaluation before training")
        logger.log(0, "eval", results["before"])
        write_json(results_path, results)

    bar = tqdm(total=total, initial=start, disable=not (progress and primary), desc=desc, dynamic_ncols=True)
    t0, seen, window, step = time.perf_counter(), 0, [], start
    skipped_in_a_row, skipped = 0, int(results.get("nonfinite_steps", 0))
    with Preempted() as preempted:
        while step < total:
            batch = next(train_iter)
            if step == start:
                check_batch(batch, run.recipe.batch_layout(config, run.cfg))
            state, metrics = run.step_fn(state, run.frozen, global_batch(batch, run.mesh))
            step += 1
            seen += config.optim.batch_size
            window.append(metrics)
            if step % config.log_every == 0 or step == total:
                flags = [float(w["nonfinite"]) for w in window]
                for flag in flags:
                    skipped_in_a_row = skipped_in_a_row + 1 if flag else 0
                skipped += int(sum(flags))
                m = {k: float(np.mean([float(w[k]) for w in window])) for k in window[0] if k != "nonfinite"}
                m.update(nonfinite_steps=float(sum(flags)), examples_per_s=seen / (time.perf_counter() - t0))
                logger.log(step, "train", m)
                bar.set_postfix(loss=f"{m['loss']:.4f}", ex_s=f"{m['examples_per_s']:.1f}")
                window = []
                if skipped_in_a_row >= config.max_nonfinite_steps:
                    bar.close()
                    ckpt.close()
                    raise NonFiniteError(
                        f"{skipped_in_a_row} steps in a row up to step {step} had a non-finite loss, gradient or "
                        f"update and were skipped (optim.lr={config.optim.lr}: too high? a NaN in the data or the "
                        "backbone?); the checkpoints hold only finite states")
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
                logger.log(step, "eval", require_finite(evaluate(state), f"the evaluation at step {step}"))
    bar.close()
    ckpt.close()
    if skipped:
        log.warning("%d steps were skipped for a non-finite loss, gradient or update", skipped)
    results["after"] = require_finite(evaluate(state), "the evaluation after training")
    results["steps"] = step
    results["nonfinite_steps"] = skipped
    logger.log(step, "eval", results["after"])
    logger.close()
    if finalize is not None:
        finalize(results, state)
    write_json(results_path, results)
    if primary:
        plot_metrics(logger.path, os.path.join(run_dir, "curves.png"))
    run.state = state
    results["run"] = run
    return results


def read_json(path: str) -> dict:
    """A JSON file the run wrote; a damaged one is named (it is rewritten from the run's state)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        log.warning("%s is not valid JSON (%s): starting it afresh", path, e)
        return {}


def write_json(path: str, obj: dict) -> None:
    """Atomically, by process 0 alone."""
    if not is_primary():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in obj.items() if k != "run"}, f, indent=2)
    os.replace(tmp, path)
