"""The AOT fit table (issue 12, item 2): every row compiled for its TPU slice by `python -m aurora_jax.aot`.

    python -m bench.aot_table [--out-dir runs/aot_table] [--rows NAME ...] [--force]

Each row is the project's config file with overrides, compiled in its own process (one at a time: a 7B
unrolled step takes minutes on a small host); its JSON report lands in --out-dir (an existing one is reused
unless --force, so an interrupted run resumes) and the table is written as table.md and table.json there.
Random-init presets stand in for the checkpoints (model.size=base with BERT's 30524 tokens for BLIP-base,
model.preset=7b for Owl); data.name=shapes stands in for the data sets, which gives the same batch layout
(`recipe.batch_layout`) and needs no files. Everything but the compile time is an XLA estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time

BLIP_BASE = {"model.size": "base", "model.vocab_size": 30524, "data.name": "shapes"}
SCAN = {"model.scan_layers": True}  # ViT / BERT / LLaMA under nn.scan: one compiled layer per stack
OWL_7B = {"model.preset": "7b", "data.name": "shapes", "data.max_len": 2048}
V1 = {**OWL_7B, "model.version": 1}

# (name, what, config, topology, overrides)
ROWS = [
    ("owl7b_lora_xla_v5e8", "Owl-7B stage 2, LoRA q,v r=8, seq 2048/chip, fsdp 8, XLA attention (before)",
     "configs/owl_v1_lora.py", "v5e:2x4", {**V1, "optim.batch_size": 8, "model.attention_impl": "xla"}),
    ("owl7b_lora_flash_v5e8", "Owl-7B stage 2, LoRA q,v r=8, seq 2048/chip, fsdp 8, flash attention (after)",
     "configs/owl_v1_lora.py", "v5e:2x4", {**V1, "optim.batch_size": 8, "model.attention_impl": "flash"}),
    ("owl7b_lora_flash_scan_v5e8", "same, flash attention, scanned layers",
     "configs/owl_v1_lora.py", "v5e:2x4", {**V1, **SCAN, "optim.batch_size": 8, "model.attention_impl": "flash"}),
    ("blip_ret_b16_scan_v5e8", "BLIP-base Aurora COCO retrieval, 384 px, momentum + queue 57,600, 16 img/chip, "
     "scanned", "configs/coco_retrieval.py", "v5e:2x4", {**BLIP_BASE, **SCAN, "optim.batch_size": 128}),
    ("blip_ret_b32_scan_v5e8", "BLIP-base Aurora COCO retrieval, 384 px, momentum + queue 57,600, 32 img/chip, "
     "scanned", "configs/coco_retrieval.py", "v5e:2x4", {**BLIP_BASE, **SCAN, "optim.batch_size": 256}),
    ("blip_vqa_b16_scan_v5e8", "BLIP-base Aurora VQA v2, 384 px, 16 img/chip, scanned",
     "configs/vqa.py", "v5e:2x4", {**BLIP_BASE, **SCAN, "optim.batch_size": 128}),
    ("owl7b_aurora_flash_v5e8", "Owl-7B, Aurora (R=32) on the LLM's attention, seq 2048/chip, fsdp 8, flash",
     "configs/owl_v1_lora.py", "v5e:2x4",
     {**V1, "optim.batch_size": 8, "model.attention_impl": "flash", "peft.method": "aurora", "peft.rank": 32}),
    ("owl2_7b_lora_flash_scan_v5e8", "Owl2-7B, LoRA r=128 on every LLM linear, seq 2048/chip, fsdp 8, flash, "
     "scanned", "configs/owl2_lora.py", "v5e:2x4",
     {**OWL_7B, **SCAN, "optim.batch_size": 8, "model.attention_impl": "flash"}),
    ("owl7b_lora_xla_v4_8", "Owl-7B stage 2, LoRA q,v r=8, seq 2048/chip, fsdp 4, XLA attention",
     "configs/owl_v1_lora.py", "v4:2x2x1", {**V1, "optim.batch_size": 4, "model.attention_impl": "xla"}),
    ("owl7b_aurora_xla_v4_8", "Owl-7B, Aurora (R=32) on the LLM's attention, seq 2048/chip, fsdp 4, XLA attention",
     "configs/owl_v1_lora.py", "v4:2x2x1",
     {**V1, "optim.batch_size": 4, "model.attention_impl": "xla", "peft.method": "aurora", "peft.rank": 32}),
]


def command(config: str, topology: str, overrides: dict, json_path: str) -> list[str]:
    """The `python -m aurora_jax.aot` command line of one row."""
    return [sys.executable, "-m", "aurora_jax.aot", f"--config={config}", f"--topology={topology}",
            f"--json={json_path}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def rss_gb(pid: int) -> float:
    """Resident memory of a process in GB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1e6
    except (OSError, StopIteration):
        return 0.0


def watch_rss(proc: subprocess.Popen, max_gb: float) -> float:
    """Wait for `proc`, killing it if its RSS passes max_gb (XLA's TPU compile of a large unrolled step can take
    most of a small host's memory); returns the peak RSS seen."""
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, rss_gb(proc.pid))
        if peak > max_gb:
            proc.kill()
            proc.wait()
            break
        time.sleep(2)
    return peak


def run_row(name: str, config: str, topology: str, overrides: dict, out_dir: str, force: bool,
            max_rss_gb: float = 1e9, compile_missing: bool = True) -> dict:
    """One row's report (its JSON), compiling it unless a previous run left one."""
    path = os.path.join(out_dir, f"{name}.json")
    failed = os.path.join(out_dir, f"{name}.error")
    if not compile_missing and not os.path.exists(path):
        with open(failed) if os.path.exists(failed) else contextlib.nullcontext() as f:
            return {"error": f.read().strip() if f else "not compiled yet"}
    if force or not os.path.exists(path):
        cmd = command(config, topology, overrides, path)
        t0 = time.perf_counter()
        with open(os.path.join(out_dir, f"{name}.log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            peak = watch_rss(proc, max_rss_gb)
        error = None
        if peak > max_rss_gb:
            error = f"stopped after {time.perf_counter() - t0:.0f} s: the compile's host RSS passed {max_rss_gb} GB"
        elif proc.returncode or not os.path.exists(path):
            error = f"exit {proc.returncode} after {time.perf_counter() - t0:.0f} s: see {name}.log"
        if error:
            with open(failed, "w") as f:
                f.write(error)
            return {"error": error}
    with open(path) as f:
        return json.load(f)


def gib(x) -> str:
    return "-" if x is None else f"{x / 1024**3:.2f}"


def markdown(rows: list[tuple], reports: dict[str, dict], meta: dict) -> str:
    """The table: one line per row, memory per chip in GiB, flops per chip, roofline numbers, compile time."""
    head = ("| row | topology | params | opt state | other state | temps | total / HBM | fits | XLA TFLOP/step "
            "| roofline step (bound) | per chip | MFU | compile |")
    lines = [f"AOT fit table, {meta['date']}, jax {meta['jax']}, libtpu {meta['libtpu']} (`python -m "
             "bench.aot_table`). Memory per chip in GiB; all but the compile time are XLA estimates.", "",
             head, "|" + " --- |" * (head.count("|") - 1)]
    for name, what, _, topology, _ in rows:
        r = reports.get(name, {})
        if "error" in r and "fits" not in r:
            lines.append(f"| {what} | {topology} | not compiled: {r['error']} |" + " |" * 10)
            continue
        fits = "FITS" if r.get("fits") else "**DOES NOT FIT**"
        total = r.get("total_bytes", r.get("xla_needed_bytes"))
        temps = r.get("temp_bytes")
        temps = gib(temps) if temps is not None else f"{gib(r.get('xla_needed_bytes'))} (XLA: over)"
        if r.get("step_s"):
            step = f"{r['step_s'] * 1e3:.0f} ms ({r['bound']})"
            rate, mfu = f"{r['per_chip_rate']:,.0f} {r['unit']}", f"{100 * r['mfu']:.0f}%"
        else:
            step = rate = mfu = "-"
        flops = f"{r['flops'] / 1e12:.1f}" if r.get("flops") else "-"
        lines.append(f"| {what} | {topology} | {gib(r.get('params_bytes'))} | {gib(r.get('opt_state_bytes'))} | "
                     f"{gib(r.get('other_state_bytes'))} | {temps} | {gib(total)} / {gib(r.get('hbm_bytes'))} | "
                     f"{fits} | {flops} | {step} | {rate} | {mfu} | {r.get('compile_s', 0):.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/aot_table")
    p.add_argument("--rows", nargs="*", default=None, help="row names, run in this order (default: all)")
    p.add_argument("--force", action="store_true", help="recompile rows that already have a report")
    p.add_argument("--no-compile", action="store_true", help="table the reports there are, compile nothing")
    p.add_argument("--max-rss-gb", type=float, default=1e9, help="stop a row whose compile holds more host memory")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    by_name = {r[0]: r for r in ROWS}
    unknown = sorted(set(args.rows or ()) - set(by_name))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(by_name)}")
    rows = ROWS if args.rows is None else [by_name[n] for n in args.rows]  # in the order given
    reports = {}
    for name, what, config, topology, overrides in rows:
        print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {name}: {what}", flush=True)
        reports[name] = run_row(name, config, topology, overrides, args.out_dir, args.force, args.max_rss_gb,
                                not args.no_compile)
        r = reports[name]
        print(f"    fits={r.get('fits')} total={gib(r.get('total_bytes', r.get('xla_needed_bytes')))} GiB "
              f"compile={r.get('compile_s', 0):.0f} s {r.get('error', '')}", flush=True)
    done = [r for r in reports.values() if "jax" in r]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "jax": done[0]["jax"] if done else "-", "libtpu": done[0]["libtpu"] if done else "-"}
    table = markdown(rows, reports, meta)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out_dir, "table.json"), "w") as f:
        json.dump({"meta": meta, "rows": [{"name": n, "what": w, "config": c, "topology": t, "overrides": o,
                                          "report": reports[n]} for n, w, c, t, o in rows]}, f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
