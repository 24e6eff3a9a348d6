"""Ahead-of-time compile of a run's train step for a TPU slice from this (CPU) host: does it fit, what does it cost.

    python -m aurora_jax.aot --config configs/owl_v1_lora.py --topology v5e:2x4 [--config.key=value ...] \
        [--json out.json]

The step is the engine's (`train.loop.setup`): the recipe's model config, loss and state, `train.state`'s step,
shardings and jit, on a mesh of the topology's devices. Parameters are abstract (`jax.eval_shape`), the batch is
the recipe's `batch_layout`: no weight and no data is read. XLA's TPU compiler (the `libtpu` wheel that matches
jax, `pip install "aurora-jax[aot]"`) runs on the host; `--topology cpu:8` compiles for the host's CPU devices
instead (tests, or a machine without libtpu).

What is printed per chip: parameters, optimizer state, other state (momentum model, queues) and the batch (from
the shardings), XLA's argument / temporary / output bytes, their total against the chip's HBM, FITS or DOES NOT
FIT, XLA's flops per step (scanned layers: every layer counted, `loop_cost`), a roofline step time
max(flops / peak, bytes / bandwidth), the throughput and MFU it implies, and the compile time. Everything but the
compile time is an XLA estimate, not a measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import re
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from typing import Any

GIB = 1024**3

# Per chip: HBM (GiB), peak dense bf16 FLOP/s, HBM bandwidth (bytes/s). Source: Google Cloud TPU documentation,
# "TPU v4" / "TPU v5e" / "TPU v5p" / "TPU v6e" system-architecture pages (cloud.google.com/tpu/docs/v4, .../v5e,
# .../v5p, .../v6e): v4 275 TFLOP/s, 1200 GB/s; v5e 197 TFLOP/s, 819 GB/s; v5p 459 TFLOP/s, 2765 GB/s;
# v6e 918 TFLOP/s, 1640 GB/s.
@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float
    peak_flops: float | None
    hbm_bandwidth: float | None
    chip_config: str = "default"  # "megacore": one device per chip (two TensorCores), as these chips run


CHIPS = {
    "v4": Chip(32, 275e12, 1200e9, "megacore"),
    "v5e": Chip(16, 197e12, 819e9),
    "v5p": Chip(95, 459e12, 2765e9, "megacore"),
    "v6e": Chip(32, 918e12, 1640e9),
}
TOPOLOGY_HELP = "v4:2x2x1, v5e:2x4, v5p:2x2x1, v6e:2x4 (generation:chips), or cpu:N (the host's CPU devices)"


CPU_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class LibtpuError(RuntimeError):
    """libtpu is missing or does not match the installed jax."""


# ------------------------------------------------------------------------------------------------ libtpu


def libtpu_requirement() -> str | None:
    """The libtpu pin of the installed jax's `tpu` extra (e.g. 'libtpu==0.0.42.*'), or None if jax names none."""
    for req in importlib.metadata.requires("jax") or []:
        spec, _, marker = req.partition(";")
        if spec.strip().startswith("libtpu") and "tpu" in marker:
            return spec.strip().replace(" ", "")
    return None


def installed_libtpu() -> str | None:
    """The installed libtpu version, or None."""
    for name in ("libtpu", "libtpu-nightly"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_libtpu() -> str:
    """The installed libtpu version when it matches jax's `tpu` extra; LibtpuError saying what to install else."""
    from packaging.requirements import Requirement

    jax_version = importlib.metadata.version("jax")
    req = libtpu_requirement()
    install = f'pip install "aurora-jax[aot]" (or pip install "{req or "libtpu"}")'
    version = installed_libtpu()
    if version is None:
        raise LibtpuError(f"TPU topologies need XLA's TPU compiler, the libtpu wheel, which is not installed: "
                          f"{install}; jax {jax_version}'s tpu extra pins {req or 'no libtpu'}. Without it, "
                          "--topology cpu:N compiles for the host's CPU devices")
    if req is not None and not Requirement(req).specifier.contains(version, prereleases=True):
        raise LibtpuError(f"libtpu {version} does not match jax {jax_version}, whose tpu extra pins {req}: {install}")
    return version


def quiet_libtpu_env() -> None:
    """libtpu on a host without TPUs: harmless placeholders (user values win) so it neither probes nor warns."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: other processes may hold libtpu too


# ------------------------------------------------------------------------------------------------ topology


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given, e.g. "v5e:2x4"
    generation: str  # "v5e", ..., or "cpu"
    devices: tuple
    chip: Chip


def parse_topology(name: str) -> tuple[str, str]:
    """'v5e:2x4' -> ('v5e', '2x4'); ValueError naming the accepted forms."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|cpu):(\d+(?:x\d+)*)", name.strip())
    if not m or (m.group(1) == "cpu") != ("x" not in m.group(2)):
        raise ValueError(f"--topology={name!r}: use {TOPOLOGY_HELP}")
    return m.group(1), m.group(2)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def target(name: str) -> Target:
    """The devices of a TPU topology (compile-only) or the first N host CPU devices."""
    generation, shape = parse_topology(name)
    if generation == "cpu":
        import jax

        n, cpus = int(shape), jax.devices("cpu")
        if len(cpus) < n:
            raise ValueError(f"--topology={name}: the host has {len(cpus)} CPU devices; start with "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        return Target(name, "cpu", tuple(cpus[:n]), Chip(host_memory_bytes() / GIB / n, None, None))
    check_libtpu()
    quiet_libtpu_env()
    from jax.experimental import topologies

    chip = CHIPS[generation]
    kw = {"chip_config_name": chip.chip_config} if chip.chip_config != "default" else {}
    devices = topologies.get_topology_desc(topology_name=f"{generation}:{shape}", platform="tpu", **kw).devices
    return Target(name, generation, tuple(devices), chip)


# ------------------------------------------------------------------------------------------------ compile


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax
    import numpy as np

    def one(x) -> int:
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize

    return sum(one(x) for x in jax.tree_util.tree_leaves(tree))


def abstract_run(config, devices: Sequence, workdir: str, depths: Sequence[int] | None = None) -> dict[str, Any]:
    """The engine's `setup` on abstract values: {'step_fn', 'args' (state, frozen, batch), 'recipe', 'mesh'}.

    `depths`: the model with these numbers of layers in its stacks (`models.stack.stack_depths`), for costing."""
    import jax

    from aurora_jax.models.stack import with_depths
    from aurora_jax.parallel.mesh import batch_sharding, make_mesh
    from aurora_jax.train.config import recipe_module, validate
    from aurora_jax.train.loop import base_shardings_for, in_run_layout, optimizer_for, train_step_for
    from aurora_jax.train.state import abstract_state, jit_train_step

    validate(config, num_devices=len(devices))
    recipe = recipe_module(config.recipe)
    tokenizer = recipe.tokenizer(config, workdir)  # a vocabulary file at most: no weight, no data
    mesh = make_mesh(tuple(config.mesh), devices)
    shardings_for = base_shardings_for(config, recipe, mesh)
    base_cfg, _ = in_run_layout(config, recipe, recipe.model_config(config, tokenizer))
    if depths is not None:
        base_cfg = with_depths(base_cfg, depths)
    cfg = recipe.with_compute(base_cfg, config)
    peft_cfg = recipe.peft_config(config)
    # The data's size only sets schedule constants (learning rate, distillation ramp): any count compiles alike.
    data = types.SimpleNamespace(steps_per_epoch=1000 * config.optim.grad_accum)
    tx = optimizer_for(config, data.steps_per_epoch // config.optim.grad_accum)
    base_sh = shardings_for(base_cfg)
    state, frozen, (state_sh, frozen_sh) = abstract_state(
        recipe.abstract_params(base_cfg), peft_cfg, tx, mesh, base_sh, seed=config.seed,
        frozen_dtype=config.compute_dtype,
        extend=lambda s, f: recipe.abstract_extend_state(config, base_cfg, s, f, base_sh, mesh))
    _, step = train_step_for(config, recipe, cfg, peft_cfg, tx, data)
    sh = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)
             for k, v in recipe.batch_layout(config, cfg).items()}
    return {"step_fn": jit_train_step(step, mesh, state_sh, frozen_sh), "args": (state, frozen, batch),
            "recipe": recipe, "mesh": mesh, "cfg": cfg}


# XLA's two wordings of an over-full chip: "HLO temporaries (16.93G) exceeds available HBM (15.75G)" and
# "Used 20.5G of 15.75G hbm".
OOM = (re.compile(r"\(([\d.]+)([KMGT])?\)\s+exceeds\s+available\s+HBM\s+\(([\d.]+)([KMGT])?\)"),
       re.compile(r"Used\s+([\d.]+)([KMGT])?\s+of\s+([\d.]+)([KMGT])?\s+hbm"))
UNITS = {None: 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def oom_numbers(message: str) -> tuple[float, float] | None:
    """(needed, available) bytes from XLA's RESOURCE_EXHAUSTED message, if it says them."""
    for pattern in OOM:
        m = pattern.search(message)
        if m:
            return float(m.group(1)) * UNITS[m.group(2)], float(m.group(3)) * UNITS[m.group(4)]
    return None


def compile_report(config, topology: str) -> dict[str, Any]:
    """Compile the config's train step for `topology` and return the per-chip report (see the module doc)."""
    import jax

    from aurora_jax.models import layers
    from aurora_jax.models.stack import stack_depths

    t = target(topology)
    n = len(t.devices)
    with tempfile.TemporaryDirectory(prefix="aot_") as workdir:
        run = abstract_run(config, t.devices, workdir)
    state, frozen, batch = run["args"]
    report: dict[str, Any] = {
        "topology": t.name, "chips": n, "generation": t.generation, "mesh": dict(run["mesh"].shape),
        "recipe": config.recipe, "global_batch": int(config.optim.batch_size),
        "jax": jax.__version__, "libtpu": installed_libtpu() if t.generation != "cpu" else None,
        "hbm_bytes": t.chip.hbm_gib * GIB,
        "params_bytes": per_device_bytes((frozen, state.trainable)),
        "frozen_bytes": per_device_bytes(frozen),
        "trainable_bytes": per_device_bytes(state.trainable),
        "opt_state_bytes": per_device_bytes(state.opt_state),
        "other_state_bytes": per_device_bytes((state.momentum, state.queues, state.step, state.rng)),
        "batch_bytes": per_device_bytes(batch),
    }
    t0 = time.perf_counter()
    try:
        with layers.compiling_for_tpu() if t.generation != "cpu" else contextlib.nullcontext():
            lowered = run["step_fn"].lower(*run["args"])
        # The CPU topology is a smoke test of the path (CI): backend optimisation off halves its compile time.
        compiled = lowered.compile(CPU_FAST if t.generation == "cpu" else None)
    except Exception as e:  # noqa: BLE001  (XLA reports an over-full chip as a runtime error at compile time)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report["compile_s"] = time.perf_counter() - t0
        numbers = oom_numbers(str(e))
        report.update(fits=False, error=str(e).splitlines()[0][:400])
        if numbers:
            report.update(xla_needed_bytes=numbers[0], xla_available_bytes=numbers[1])
        return report
    report["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    code = int(mem.generated_code_size_in_bytes)
    total = args + out - alias + temp + code
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    if config.model.get("scan_layers", False):
        del compiled, lowered  # the small compiles below need the host memory more
        t0 = time.perf_counter()
        every_layer = loop_cost(config, t, stack_depths(run["cfg"]), CPU_FAST if t.generation == "cpu" else None)
        report.update(xla_loop_flops=flops, xla_loop_bytes_accessed=nbytes, stack_depths=every_layer["depths"],
                      loop_cost_s=time.perf_counter() - t0)
        flops, nbytes = every_layer["flops"], every_layer["bytes_accessed"]
    report.update(argument_bytes=args, output_bytes=out, alias_bytes=alias, temp_bytes=temp, code_bytes=code,
                  total_bytes=total, fits=total <= report["hbm_bytes"], flops=flops, bytes_accessed=nbytes)
    report.update(roofline(report, t.chip, n, batch))
    return report


def loop_cost(config, t: Target, real: list[int], compile_options: dict | None) -> dict[str, Any]:
    """Flops and bytes of a scanned step as if every layer were counted.

    XLA's cost analysis counts a loop body once, so a scanned step reports one layer per stack. The step's cost is
    linear in each stack's depth: compiling the unrolled step with every stack at 1 layer, then each stack at 2 in
    turn (small programs), gives the cost outside the stacks plus one layer of each; the cost at the real depths
    L_s (`real`, in `models.stack.stack_depths` order) is
    c(1, ..., 1) + sum_s (L_s - 1) (c(.., 2 at s, ..) - c(1, ..., 1)).
    """
    from aurora_jax.models import layers

    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan_layers = False

    def cost(depths: list[int]) -> tuple[float, float]:
        with tempfile.TemporaryDirectory(prefix="aot_") as workdir:
            run = abstract_run(unrolled, t.devices, workdir, depths)
        with layers.compiling_for_tpu() if t.generation != "cpu" else contextlib.nullcontext():
            c = run["step_fn"].lower(*run["args"]).compile(compile_options).cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0))

    one = cost([1] * len(real))
    flops, nbytes = one
    for s, depth in enumerate(real):
        two = cost([2 if i == s else 1 for i in range(len(real))])
        flops += (depth - 1) * (two[0] - one[0])
        nbytes += (depth - 1) * (two[1] - one[1])
    return {"flops": flops, "bytes_accessed": nbytes, "depths": real}


def roofline(report: dict, chip: Chip, chips: int, batch: dict) -> dict[str, Any]:
    """Step time max(flops / peak, bytes / bandwidth) per chip, the throughput it allows and the MFU at it."""
    if chip.peak_flops is None:
        return {"step_s": None}
    compute_s, memory_s = report["flops"] / chip.peak_flops, report["bytes_accessed"] / chip.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    out = {"compute_s": compute_s, "memory_s": memory_s, "step_s": step_s,
           "bound": "compute" if compute_s >= memory_s else "memory",
           "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth}
    if step_s <= 0:
        return out
    examples = report["global_batch"] / chips
    if "input_ids" in batch:  # sequence models: tokens per second
        out.update(unit="tok/s", per_chip_rate=examples * batch["input_ids"].shape[1] / step_s)
    else:
        out.update(unit="img/s", per_chip_rate=examples / step_s)
    # XLA's flops include the recomputation of remat; MFU counts them as useful, so it is an upper bound.
    out["mfu"] = report["flops"] / (step_s * chip.peak_flops)
    return out


# ------------------------------------------------------------------------------------------------ printing


def gib(x: float | None) -> str:
    """Bytes in GiB, or MiB below one GiB (tiny test models)."""
    if x is None:
        return "-"
    return f"{x / GIB:.2f} GiB" if x >= GIB else f"{x / 1024**2:.1f} MiB"


def format_report(r: dict[str, Any]) -> str:
    """The report as the lines the CLI prints."""
    lines = [f"topology {r['topology']} ({r['chips']} chips, mesh {r['mesh']}), recipe {r['recipe']}, "
             f"global batch {r['global_batch']}; jax {r['jax']}, libtpu {r['libtpu'] or '-'}",
             "per chip:",
             f"  parameters       {gib(r['params_bytes'])} (frozen {gib(r['frozen_bytes'])}, trainable "
             f"{gib(r['trainable_bytes'])})",
             f"  optimizer state  {gib(r['opt_state_bytes'])}",
             f"  other state      {gib(r['other_state_bytes'])} (momentum model, queues, step, rng)",
             f"  batch            {gib(r['batch_bytes'])}"]
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    if "temp_bytes" not in r:
        needed = r.get("xla_needed_bytes")
        lines.append(f"  XLA: {r['error']}")
        lines.append(f"  total            {gib(needed)} (XLA's count) vs HBM {gib(r['hbm_bytes'])}: {verdict}")
    else:
        lines += [f"  arguments        {gib(r['argument_bytes'])} (outputs {gib(r['output_bytes'])}, aliased "
                  f"{gib(r['alias_bytes'])})",
                  f"  activations/temp {gib(r['temp_bytes'])}",
                  f"  total            {gib(r['total_bytes'])} vs HBM {gib(r['hbm_bytes'])}: {verdict}",
                  f"  XLA flops/step   {r['flops']:.4g}, bytes accessed {r['bytes_accessed']:.4g}"]
        if r.get("stack_depths"):
            lines.append(f"                   (scanned layers: XLA counts a loop body once, {r['xla_loop_flops']:.4g} "
                         f"flops; every layer costed from 1- and 2-layer compiles, depths {r['stack_depths']})")
        if r.get("step_s"):
            lines.append(f"  roofline step    {r['step_s'] * 1e3:.1f} ms ({r['bound']}-bound: compute "
                         f"{r['compute_s'] * 1e3:.1f} ms, memory {r['memory_s'] * 1e3:.1f} ms) -> "
                         f"{r['per_chip_rate']:,.0f} {r['unit']} per chip, MFU {100 * r['mfu']:.0f}%")
    lines.append(f"  compile time     {r['compile_s']:.1f} s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags

    FLAGS = flags.FLAGS
    try:
        report = compile_report(FLAGS.config, FLAGS.topology)
    except (LibtpuError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(format_report(report))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=2, default=lambda o: o if math.isfinite(o) else None)


def run() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    quiet_libtpu_env()  # before the config file's imports initialise jax's backends (libtpu among them)
    from aurora_jax.train.__main__ import override_error, parse_flags

    try:
        config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
    except (KeyError, AttributeError) as e:
        raise SystemExit(f"error: {override_error(sys.argv, e)}") from None
    flags.DEFINE_string("topology", "v5e:2x4", f"what to compile for: {TOPOLOGY_HELP}")
    flags.DEFINE_string("json", "", "also write the report to this JSON file")
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
