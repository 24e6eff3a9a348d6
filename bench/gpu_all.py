"""Every GPU row of the benchmark table in one run (made to fit one 10-minute call), written as markdown + JSON.

Rows (bfloat16 on a GPU; same weights, same inputs, same device, same process on both sides):
  BLIP-base Aurora retrieval train step (384 px, text 35, R 64, ICE, GQT), batch 32 and 64:
      JAX vs torch eager vs torch.compile (bench_blip train; torch = bench.torch_aurora on transformers' BLIP)
  LLaMA-7B greedy decode, batch 1 and 32: `aurora_jax.generate` vs `LlamaForCausalLM.generate` (bench_llama decode)
  LLaMA-7B LoRA q,v r=8 train step, sequence 2048, micro-batch 4: JAX (remat) vs transformers + peft with
      gradient checkpointing (bench_llama lora_train)
Each benchmark gets a deadline: a row that would start with too little time left is skipped and marked so,
and the tables are rewritten after every benchmark, so a run cut short still leaves what it measured.
Compilation caches (JAX's and inductor's) go to --cache-dir, so a second run on the same machine compiles less.

  python -m bench.gpu_all --out $OUT                  (GPU: all rows, ~10 minutes)
  python -m bench.gpu_all --tiny --out /tmp/gpu_all   (CPU: tiny shapes, the same code paths, seconds)
  --only blip | llama   runs one half (e.g. to rerun what a first call skipped)

Nothing here imports the data stack (grain, tensorflow_datasets, ml_collections): the GPU machine lacks it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

# Before JAX or torch start: JAX must share the GPU with torch (no 75% preallocation); caches for a rerun.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Seconds a benchmark needs at the least (model build, conversion, one compile): below that it is not started.
MIN_S = {"blip": 120.0, "llama": 200.0}
ROWS_DOC = {
    "blip": "BLIP-base Aurora train step (384 px, text 35, R 64): JAX vs torch eager / torch.compile",
    "llama": "LLaMA-7B decode (prompt 512, 128 new tokens) and LoRA q,v r=8 train (seq 2048, mb 4, remat)",
}


def blip_argv(tiny: bool, json_path: str, deadline: float) -> list[str]:
    common = ["--cases", "train", "--json", json_path, "--deadline", str(deadline)]
    if tiny:  # one layer, width 32, 32 px: the code paths only; dynamo with the eager backend (no C++ compile)
        return ["--size", "micro", "--train-batch", "4", "--rank", "4", "--warmup", "0", "--repeats", "1",
                "--torch-compile", "eager", "--cpu-threads", "1", "--reserve-s", "0", "--fast-compile", *common]
    return ["--size", "base", "--dtype", "bfloat16", "--train-batch", "32", "64", "--torch-compile", "default",
            "--warmup", "3", "--repeats", "10", "--reserve-s", "150", *common]


def llama_argv(tiny: bool, json_path: str, deadline: float) -> list[str]:
    common = ["--cases", "decode", "lora_train", "--json", json_path, "--deadline", str(deadline)]
    if tiny:
        # one decode batch size: b1 and b32 on the GPU run the same code, each compile costs seconds on a CPU
        return ["--size", "tiny", "--batch-sizes", "2", "--prompt-len", "8", "--new-tokens", "3",
                "--train-batch", "2", "--train-len", "16", "--warmup", "0", "--repeats", "1", "--gen-warmup", "0",
                "--gen-repeats", "1", "--cpu-threads", "1", "--reserve-s", "0", "--fast-compile", *common]
    return ["--size", "7b", "--dtype", "bfloat16", "--batch-sizes", "1", "32", "--train-batch", "4",
            "--train-len", "2048", "--warmup", "2", "--repeats", "5", "--gen-warmup", "1", "--gen-repeats", "2",
            "--reserve-s", "90", *common]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "torch", "transformers", "peft", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "-"
    try:
        import torch

        out["cuda"] = torch.version.cuda or "-"
    except ImportError:
        pass
    return out


def _f(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per measured (or skipped) row of every benchmark."""
    out = []
    for name, payload in results.items():
        for r in payload.get("rows", []):
            unit = "img/s" if name == "blip" else "tok/s"
            rec = {"bench": name, "case": r.get("case"), "batch": r.get("batch"), "dtype": r.get("dtype"),
                   "unit": unit, "skipped": r.get("skipped")}
            key = "img_s" if name == "blip" else "tok_s"
            rec.update({"jax_ms": r.get("jax_ms"), "jax_tput": r.get(f"jax_{key}"),
                        "torch_ms": r.get("torch_ms"), "torch_tput": r.get(f"torch_{key}"),
                        "compile_ms": r.get("torch_compile_ms"), "compile_tput": r.get(f"torch_compile_{key}"),
                        "ratio": r.get("ratio"), "ratio_compile": r.get("ratio_compile"),
                        "jax_mfu": r.get("jax_mfu", r.get("jax_mbu")), "torch_mfu": r.get("torch_mfu",
                                                                                          r.get("torch_mbu")),
                        "compile_mfu": r.get("torch_compile_mfu"),
                        "util": "MBU" if r.get("case") == "decode" else "MFU",
                        "jax_compile_s": r.get("compile_s"), "torch_compile_s": r.get("torch_compile_s"),
                        "check": r.get("check"), "attention": r.get("attention")})
            out.append(rec)
    return out


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    v = meta["versions"]
    head = (f"{meta['date_utc']}, {meta['device']}, jax {v.get('jax')} / flax {v.get('flax')}, torch {v.get('torch')} "
            f"(CUDA {v.get('cuda', '-')}), transformers {v.get('transformers')}, peft {v.get('peft')}; "
            f"{'tiny shapes (code check, not a measurement)' if meta['tiny'] else 'bfloat16'}; "
            f"wall {meta['wall_s']:.0f} s\n\n")
    cols = ("bench", "case", "batch", "JAX ms", "JAX thr.", "torch ms", "torch thr.", "compile ms", "compile thr.",
            "JAX/torch", "JAX/compile", "util JAX / torch / compile", "compile s JAX / torch", "check")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["skipped"]:
            lines.append(f"| {r['bench']} | {r['case']} | {r['batch']} | skipped: {r['skipped']} |"
                         + " |" * (len(cols) - 4))
            continue
        check = r["check"] or {}
        check_s = ", ".join(f"{k} {_f(val)}" for k, val in check.items()
                            if k in ("max_rel", "equal_frac", "first_mismatch"))
        lines.append("| " + " | ".join([
            r["bench"], r["case"], str(r["batch"]), _f(r["jax_ms"]), f"{_f(r['jax_tput'], '.4g')} {r['unit']}",
            _f(r["torch_ms"]), _f(r["torch_tput"], ".4g"), _f(r["compile_ms"]), _f(r["compile_tput"], ".4g"),
            _f(r["ratio"]), _f(r["ratio_compile"]),
            f"{r['util']} {_pct(r['jax_mfu'])} / {_pct(r['torch_mfu'])} / {_pct(r['compile_mfu'])}",
            f"{_f(r['jax_compile_s'], '.0f')} / {_f(r['torch_compile_s'], '.0f')}", check_s]) + " |")
    notes = ("\nthr. = throughput (img/s BLIP, tok/s LLaMA); JAX/torch = torch time / JAX time (> 1: JAX faster). "
             "MFU = XLA's FLOP count of the JAX program (remat recompute included) / time / datasheet peak, the "
             "same count for both sides; decode shows MBU (weights + KV bytes per step / time / peak bandwidth). "
             "Medians of repeated calls after warm-up, each call synchronised.\n")
    return head + "\n".join(lines) + "\n" + notes


def write_outputs(out: Path, meta: dict[str, Any], results: dict[str, Any]) -> None:
    rows = table_rows(results)
    (out / "gpu_all.json").write_text(json.dumps({"meta": meta, "rows": rows, "results": results}, indent=2,
                                                 default=str))
    (out / "gpu_all.md").write_text(markdown(meta, rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_all.md / gpu_all.json")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check of every code path)")
    p.add_argument("--only", choices=sorted(ROWS_DOC), nargs="+", default=sorted(ROWS_DOC))
    p.add_argument("--budget-s", type=float, default=560.0, help="wall seconds for everything (one call: 600)")
    p.add_argument("--cache-dir", default="/tmp/aurora_bench_cache",
                   help="JAX and inductor compilation caches, kept while the machine is ('' = none)")
    return p.parse_args(argv)


def enable_caches(cache_dir: str) -> None:
    """JAX's persistent compilation cache and inductor's cache in `cache_dir` (kept between calls on one machine)."""
    import jax

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "inductor"))
    jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir) / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cache_dir and not args.tiny:
        enable_caches(args.cache_dir)
    import jax

    from bench import bench_blip, bench_llama

    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "tiny": args.tiny,
            "versions": versions(), "budget_s": args.budget_s, "wall_s": 0.0}
    results: dict[str, Any] = {}
    benches = {"blip": (bench_blip.main, blip_argv), "llama": (bench_llama.main, llama_argv)}
    for name in ("blip", "llama"):
        if name not in args.only:
            continue
        run, make_argv = benches[name]
        if not args.tiny and deadline - time.time() < MIN_S[name]:
            results[name] = {"rows": [{"case": "all", "batch": "-", "skipped": "time budget (rerun with --only "
                                       f"{name})"}]}
            write_outputs(out, meta, results)
            continue
        print(f"== gpu_all: {ROWS_DOC[name]} ({time.time() - t0:.0f} s elapsed)", flush=True)
        try:
            results[name] = run(make_argv(args.tiny, str(out / f"{name}.json"), deadline))
        except Exception as e:  # noqa: BLE001 - one benchmark failing must not lose the other's rows
            partial = out / f"{name}.json"
            results[name] = json.loads(partial.read_text()) if partial.exists() else {"rows": []}
            results[name]["error"] = f"{type(e).__name__}: {e}"
            print(f"   {name} failed: {results[name]['error']}", flush=True)
            traceback.print_exc()
        meta["wall_s"] = time.time() - t0
        write_outputs(out, meta, results)
    print((out / "gpu_all.md").read_text())
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
