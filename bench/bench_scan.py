"""Unrolled vs scanned layers (issue 12, item 3): compile time, memory, step time and the step's output, one run.

    python -m bench.bench_scan [--config configs/coco_retrieval.py] [--cpu-batch 2] [--steps 3] \
        [--topology v5e:2x4 --tpu-batch 128] [--set key=value ...] [--out runs/bench_scan]

The same config (default: BLIP-base Aurora COCO retrieval, 384 px, momentum + queue, random init) in both layouts
(`model.scan_layers` False / True), each part in its own process, one at a time:
- cpu: the engine's run (`train.loop.setup`) on one CPU device; lower + compile of its train step with XLA's
  default options (timed), then `--steps` steps (the first one excluded from the step time). The loss of every
  step and the trainable tree after the last are saved, and the two layouts are compared leaf by leaf. Both
  parts run without dropout (`NO_DROPOUT`), so that both layouts compute the same function.
- tpu (with --topology): `aurora_jax.aot.compile_report` of the same config for the slice: XLA's TPU compile time
  and per-chip memory, from this host (needs libtpu, `pip install -e ".[aot]"`).
Compile and step times are measurements on this host; TPU memory is XLA's estimate. A part whose host RSS passes
--max-rss-gb is stopped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.aot_table import BLIP_BASE, watch_rss

LAYOUTS = {"unrolled": False, "scanned": True}
# Dropout masks are drawn per layer by different rng paths in the two layouts; without dropout both steps compute
# the same function and their outputs can be compared. (Dropout costs the same in either layout.)
NO_DROPOUT = {"model.dropout": 0.0, "model.attention_dropout": 0.0, "peft.dropout": 0.0, "momentum.dropout": False}


def load_config(path: str, overrides: dict):
    """The config file's `get_config()` with dotted-key overrides (command-line strings take the key's type)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    flat = {}
    for key, value in overrides.items():
        old = config
        for part in key.split("."):
            old = old[part]
        if isinstance(value, str) and not isinstance(old, str):
            value = value in ("True", "true", "1") if isinstance(old, bool) else type(old)(value)
        flat[key] = value
    config.update_from_flattened_dict(flat)
    return config


def cpu_part(config, steps: int, out: str) -> dict:
    """Compile and run the engine's step on one CPU device; saves losses and the trainable tree to `out`.npz."""
    import jax

    from aurora_jax.train.loop import global_batch, setup

    with tempfile.TemporaryDirectory(prefix="bench_scan_") as workdir:
        run = setup(config, workdir)
        it = iter(run.data.train)
        batches = [global_batch(next(it), run.mesh) for _ in range(steps)]
        t0 = time.perf_counter()
        compiled = run.step_fn.lower(run.state, run.frozen, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        state, losses, times = run.state, [], []
        for batch in batches:
            t0 = time.perf_counter()
            state, metrics = compiled(state, run.frozen, batch)
            losses.append(float(jax.block_until_ready(metrics["loss"])))
            times.append(time.perf_counter() - t0)
        flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
            state.trainable)}
    np.savez(out + ".npz", losses=np.asarray(losses), **flat)
    return {"compile_s": compile_s, "step_s": float(np.mean(times[1:])) if steps > 1 else times[0],
            "losses": losses, "cpu_batch": int(config.optim.batch_size)}


def tpu_part(config, topology: str) -> dict:
    from aurora_jax.aot import compile_report, quiet_libtpu_env

    quiet_libtpu_env()
    r = compile_report(config, topology)
    return {k: r.get(k) for k in ("compile_s", "temp_bytes", "argument_bytes", "total_bytes", "hbm_bytes", "fits",
                                  "flops", "topology", "libtpu", "error")}


def child(args) -> None:
    overrides = json.loads(args.overrides)
    config = load_config(args.config, overrides)
    result = cpu_part(config, args.steps, args.out) if args.part == "cpu" else tpu_part(config, args.topology)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f)


def run_part(part: str, layout: str, args, overrides: dict) -> dict:
    out = os.path.join(args.out, f"{part}_{layout}")
    cmd = [sys.executable, "-m", "bench.bench_scan", "--child", part, "--config", args.config, "--steps",
           str(args.steps), "--topology", args.topology or "", "--out", out, "--overrides", json.dumps(overrides)]
    env = {**os.environ}
    if part == "tpu":
        env.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
        env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    else:
        env["JAX_PLATFORMS"] = "cpu"
    t0 = time.perf_counter()
    with open(out + ".log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = watch_rss(proc, args.max_rss_gb)
    wall = time.perf_counter() - t0
    if peak > args.max_rss_gb:
        return {"error": f"stopped after {wall:.0f} s at {peak:.1f} GB host RSS", "peak_rss_gb": peak}
    if proc.returncode or not os.path.exists(out + ".json"):
        return {"error": f"exit {proc.returncode} after {wall:.0f} s (see {out}.log)", "peak_rss_gb": peak}
    with open(out + ".json") as f:
        return {**json.load(f), "peak_rss_gb": peak}


def compare(out: str) -> dict:
    """Largest relative difference of the losses and of each trainable leaf between the two layouts."""
    a, b = (np.load(os.path.join(out, f"cpu_{name}.npz")) for name in LAYOUTS)
    worst, where, equal = 0.0, "", True
    for key in a.files:
        x, y = a[key].astype(np.float64), b[key].astype(np.float64)
        equal &= bool(np.array_equal(x, y))
        err = float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-30))
        if err > worst:
            worst, where = err, key
    return {"bit_equal": equal, "max_rel_diff": worst, "worst_leaf": where}


def gib(x) -> str:
    return "-" if x is None else f"{x / 1024**3:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/coco_retrieval.py")
    p.add_argument("--cpu-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--topology", default="", help="also compile for this TPU slice (e.g. v5e:2x4)")
    p.add_argument("--tpu-batch", type=int, default=128)
    p.add_argument("--set", nargs="*", default=[], help="more config overrides key=value")
    p.add_argument("--out", default="runs/bench_scan")
    p.add_argument("--max-rss-gb", type=float, default=16.0)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.part = args.child
        child(args)
        return
    os.makedirs(args.out, exist_ok=True)
    extra = dict(kv.split("=", 1) for kv in args.set)
    base = {**BLIP_BASE, "data.num_train": 4 * args.cpu_batch * args.steps, "data.num_test": 4,
            "eval.at_start": False, **(NO_DROPOUT if args.config.endswith(("retrieval.py", "vqa.py")) else {}),
            **extra}
    results = {}
    for layout, scan in LAYOUTS.items():
        over = {**base, "model.scan_layers": scan}
        results[f"cpu_{layout}"] = run_part("cpu", layout, args, {**over, "optim.batch_size": args.cpu_batch})
        print(layout, "cpu", results[f"cpu_{layout}"], flush=True)
        if args.topology:
            results[f"tpu_{layout}"] = run_part("tpu", layout, args, {**over, "optim.batch_size": args.tpu_batch})
            print(layout, "tpu", results[f"tpu_{layout}"], flush=True)
    if all("error" not in results[f"cpu_{k}"] for k in LAYOUTS):
        results["outputs"] = compare(args.out)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results, args))


def table(results: dict, args) -> str:
    lines = [f"| layout | CPU compile | CPU step (batch {args.cpu_batch}) | CPU peak RSS | "
             f"TPU {args.topology or '-'} compile | TPU temps / total per chip (GiB) | TPU compile peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for layout in LAYOUTS:
        c, t = results[f"cpu_{layout}"], results.get(f"tpu_{layout}", {})
        cpu = (f"{c['compile_s']:.1f} s | {c['step_s']:.2f} s | {c['peak_rss_gb']:.1f} GB" if "error" not in c
               else f"{c['error']} | | ")
        if not t:
            tpu = "- | - | -"
        elif "error" in t and t.get("compile_s") is None:
            tpu = f"{t['error']} | | "
        else:
            tpu = f"{t['compile_s']:.0f} s | {gib(t.get('temp_bytes'))} / {gib(t.get('total_bytes'))} | " \
                  f"{t['peak_rss_gb']:.1f} GB"
        lines.append(f"| {layout} | {cpu} | {tpu} |")
    if "outputs" in results:
        o = results["outputs"]
        lines.append(f"\nstep outputs after {args.steps} steps (losses and every trainable leaf): "
                     f"bit-equal {o['bit_equal']}, largest relative difference {o['max_rel_diff']:.1e} "
                     f"({o['worst_leaf']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
