"""Checkpoint conversion throughput and peak memory: `python -m aurora_jax.convert llama` vs a plain read.

Builds a random LLaMA-shaped HF folder (config.json, `model-0000K-of-0000N.safetensors` shards and the
index, written tensor by tensor so building it needs little memory), then runs each phase in its own
child process and reports wall time, GB/s (source bytes / time) and the child's peak RSS (VmHWM):
  floor   every tensor read once with `safetensors.safe_open` (one shard open at a time), then dropped
  copy    the shards copied byte for byte (shutil.copyfile): the disk's read + write floor
  new       the CLI: `aurora_jax.convert.cli.main(['llama', ...])`, streamed into orbax (zstd, orbax's default)
  new_raw   the same with --no-compress
  old       the path before streaming: `convert_llama` (the whole numpy tree) then one zstd orbax save;
            with --old-code DIR, the aurora_jax package found in DIR (e.g. the last commit's)

Run from the repository root:
  python -m bench.bench_convert --hidden 3200 --layers 26 --mlp 8640 --shards 4 --phases floor,copy,new,old
  python -m bench.bench_convert --hidden 4096 --layers 32 --mlp 11008 --shards 3          # LLaMA-7B, 13.5 GB
The generated folders are deleted at the end unless --keep is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PHASES = ("floor", "copy", "new", "new_raw", "old")
# Values are drawn once into a pool of this many bytes and tensors take slices of it at random offsets:
# N(0, 0.02) in bfloat16 like trained weights (zstd finds the same ~20% in them), at disk speed. zstd's
# window (<= 8 MB at the levels orbax uses) never spans a repeat.
POOL_BYTES = 64 << 20
BLOCK = 16 << 20  # bytes per write while building


# ------------------------------------------------------------------------------------- the checkpoint


def llama_shapes(hidden: int, layers: int, mlp: int, vocab: int, kv_heads: int, head_dim: int) -> list:
    """(key, shape) of an HF LlamaForCausalLM state dict, in the order HF writes its shards."""
    kv = kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (mlp, hidden)),
            (p + "mlp.up_proj.weight", (mlp, hidden)),
            (p + "mlp.down_proj.weight", (hidden, mlp)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def split_shards(shapes: list, itemsize: int, n: int) -> list[list]:
    """Consecutive groups of about equal byte size (HF's max_shard_size splitting, by count instead)."""
    total = sum(math.prod(s) * itemsize for _, s in shapes)
    groups: list[list] = [[]]
    done = 0
    for key, shape in shapes:
        size = math.prod(shape) * itemsize
        if groups[-1] and done + size / 2 > total * len(groups) / n and len(groups) < n:
            groups.append([])
        groups[-1].append((key, shape))
        done += size
    return groups


def value_pool(rng: np.random.Generator) -> bytes:
    """POOL_BYTES of bfloat16 N(0, 0.02) values, as raw bytes."""
    import ml_dtypes

    return rng.normal(0.0, 0.02, POOL_BYTES // 2).astype(np.float32).astype(ml_dtypes.bfloat16).tobytes()


def tensor_bytes(pool: bytes, rng: np.random.Generator, nbytes: int) -> Iterator[bytes]:
    """`nbytes` of values from the pool, from a random even offset on, wrapping around, in blocks."""
    pos = 2 * int(rng.integers(len(pool) // 2))
    while nbytes:
        n = min(nbytes, BLOCK, len(pool) - pos)
        yield pool[pos:pos + n]
        nbytes -= n
        pos = (pos + n) % len(pool)


def write_safetensors(path: Path, tensors: list, pool: bytes, rng: np.random.Generator) -> int:
    """A bf16 safetensors file of pool values, written block by block; returns its data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in tensors:
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape in tensors:
            for block in tensor_bytes(pool, rng, 2 * math.prod(shape)):
                f.write(block)
    return offset


def build_checkpoint(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """config.json + shards + model.safetensors.index.json; returns sizes for the report."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(args.hidden, args.layers, args.mlp, args.vocab, args.heads, args.hidden // args.heads)
    groups = split_shards(shapes, 2, args.shards)
    rng = np.random.default_rng(args.seed)
    pool = value_pool(rng)
    weight_map, shard_bytes = {}, []
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard_bytes.append(write_safetensors(folder / name, group, pool, rng))
        weight_map.update({k: name for k, _ in group})
    index = {"metadata": {"total_size": sum(shard_bytes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.hidden, "intermediate_size": args.mlp, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.heads, "vocab_size": args.vocab,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {"total_bytes": sum(shard_bytes), "largest_shard_bytes": max(shard_bytes), "shards": len(groups),
            "tensors": len(shapes)}


# ------------------------------------------------------------------------------------------- phases
# Each runs in a fresh child process (`--phase NAME`), so its VmHWM is its own peak.


def shard_files(src: Path) -> list[Path]:
    return sorted(src.glob("*.safetensors"))


def phase_floor(src: Path, dst: Path) -> None:
    """Every tensor read once through safetensors' own API, one shard open at a time."""
    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors' numpy reader needs
    from safetensors import safe_open

    for f in shard_files(src):
        with safe_open(str(f), framework="np") as h:
            for k in h.keys():
                h.get_tensor(k)  # read (a copy out of the memory map) and dropped


def phase_copy(src: Path, dst: Path) -> None:
    """The shards copied byte for byte: what reading and writing this much costs on this disk."""
    dst.mkdir(parents=True)
    for f in shard_files(src):
        shutil.copyfile(f, dst / f.name)


def run_cli(src: Path, dst: Path, *flags: str) -> None:
    """The CLI: plan, then every tensor streamed into the orbax checkpoint as it is converted."""
    from aurora_jax.convert import cli

    if cli.main(["llama", "--src", str(src), "--dst", str(dst), "--dtype", "bfloat16", "--no-progress", *flags]):
        raise SystemExit("conversion failed")


def phase_new(src: Path, dst: Path) -> None:
    run_cli(src, dst)


def phase_new_raw(src: Path, dst: Path) -> None:
    run_cli(src, dst, "--no-compress")


def phase_old(src: Path, dst: Path) -> None:
    """The path before streaming: the whole numpy tree in memory, then one zstd orbax save of it."""
    from aurora_jax.convert.llama import convert_llama
    from aurora_jax.convert.store import save_converted

    cfg, params = convert_llama(src, dtype="bfloat16")
    save_converted(dst, cfg, params)  # zstd, orbax's default


PHASE_FUNCS = {"floor": phase_floor, "copy": phase_copy, "new": phase_new, "new_raw": phase_new_raw,
               "old": phase_old}


def vm_hwm_bytes() -> int:
    """This process's peak resident set (VmHWM), file-backed pages of memory maps included."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_phase_here(name: str, src: Path, dst: Path) -> dict[str, Any]:
    """Run one phase in this process (imports included in the time), then sync what it wrote."""
    load = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    PHASE_FUNCS[name](src, dst)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    t1 = time.perf_counter()
    os.sync()  # timed apart: the writers return with their last bytes still in the page cache
    return {"phase": name, "seconds": seconds, "cpu_s": cpu, "sync_s": time.perf_counter() - t1,
            "peak_rss": vm_hwm_bytes(), "load_avg_1m": load}


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (the kernel's share of the I/O included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def evict(files: list[Path]) -> None:
    """Drop these files from the page cache (posix_fadvise), so a phase reads them from disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_phase(name: str, src: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One phase in a child process; its JSON line back, plus the size of what it wrote."""
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    if args.cold:
        evict(shard_files(src))
    cmd = [sys.executable, "-m", "bench.bench_convert", "--phase", name, "--src", str(src), "--dst", str(dst)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if name == "old" and args.old_code:
        # Run this file as a script, so `aurora_jax` comes from PYTHONPATH and not from this checkout.
        cmd[1:3] = [str(Path(__file__).resolve())]
        env["PYTHONPATH"] = str(Path(args.old_code).resolve())
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if res.returncode:
        return {"phase": name, "error": (res.stderr or res.stdout).strip().splitlines()[-1:]}
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["out_bytes"] = folder_bytes(dst)
    shutil.rmtree(dst, ignore_errors=True)
    return row


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=3200)
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--mlp", type=int, default=8640)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--phases", default="floor,copy,new", help=f"comma-separated, of {', '.join(PHASES)}")
    p.add_argument("--cold", action="store_true", help="evict the shards from the page cache before each phase")
    p.add_argument("--old-code", default=None,
                   help="run `old` against the aurora_jax package in this folder, e.g. the code before streaming:"
                        " git archive HEAD aurora_jax | tar -x -C DIR")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated source checkpoint")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    # child mode
    p.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--src", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dst", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    return args


def describe() -> dict[str, Any]:
    from bench import common

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "cpu": f"{common.cpu_model()} ({os.cpu_count()} logical cores)", "ram_gib": round(mem / 2**30, 1),
            "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()}


def report(rows: list[dict[str, Any]], sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: GB/s of source bytes, peak RSS and its ratio to the budget (1.2 x shard + 1 GB)."""
    budget = 1.2 * sizes["largest_shard_bytes"] + 1e9
    out = []
    for r in rows:
        if "error" in r:
            out.append({"phase": r["phase"], "s": None, "GB/s": None, "peak RSS GB": None, "note": r["error"]})
            continue
        gbs = sizes["total_bytes"] / r["seconds"] / 1e9
        out.append({
            "phase": r["phase"], "s": round(r["seconds"], 1), "GB/s": round(gbs, 3), "sync s": round(r["sync_s"], 1),
            "CPU s": round(r["cpu_s"], 1), "load": round(r["load_avg_1m"], 1),
            "peak RSS GB": round(r["peak_rss"] / 1e9, 2), "RSS / budget": round(r["peak_rss"] / budget, 2),
            "out GB": round(r["out_bytes"] / 1e9, 2),
        })
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.phase:  # child
        print(json.dumps(run_phase_here(args.phase, Path(args.src), Path(args.dst))))
        return {}
    from bench import common

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    src = work / "src"
    info = describe()
    shapes = {k: getattr(args, k) for k in ("hidden", "layers", "mlp", "vocab", "heads", "shards")}
    print(f"== conversion: random LLaMA {shapes}, bf16 -> bf16, {'cold' if args.cold else 'warm'} page cache")
    print(f"   {info['date_utc']} | {info['cpu']} | {info['ram_gib']} GiB RAM | load avg {info['load_avg_1m']:.1f}")
    try:
        t0 = time.perf_counter()
        sizes = build_checkpoint(src, args)
        print(f"   built {sizes['total_bytes'] / 1e9:.2f} GB in {sizes['shards']} shards (largest"
              f" {sizes['largest_shard_bytes'] / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
        rows = [run_phase(name, src, work / f"out_{name}", args) for name in args.phases.split(",")]
    finally:
        if not args.keep:
            shutil.rmtree(work if args.workdir is None else src, ignore_errors=True)
    table = report(rows, sizes)
    budget = (1.2 * sizes["largest_shard_bytes"] + 1e9) / 1e9
    print(f"   GB/s = source bytes / phase time; RSS budget = 1.2 x largest shard + 1 GB = {budget:.2f} GB")
    print("   CPU s = user + system time of the phase's process; load = 1-minute load average when it started")
    common.print_table(table, ["phase", "s", "GB/s", "sync s", "CPU s", "load", "peak RSS GB", "RSS / budget",
                               "out GB", "note"])
    payload = {"info": info, "shapes": shapes, "sizes": sizes, "cold": args.cold,
               "rows": rows, "table": table}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
