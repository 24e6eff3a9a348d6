"""Shared benchmark helpers: timing, FLOPs (XLA cost analysis + analytic), floors, MFU, devices, output.

How we time (shared/.library METHOD): warm-up calls first (compilation, autotuning and allocator growth stay
out), a device sync after every call (`jax.block_until_ready`, `torch.cuda.synchronize`) before the host clock
is read, the median of N repeats with the spread (max - min) / median, and inputs rotated among a few
distinct sets so no run is timed on the exact buffers of the previous one. Two numbers come first: the FLOPs
a case must do and the fewest bytes it must move; over the peak rates they give a floor time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.convert.readers import DictSource, to_numpy

# JAX and PyTorch share one GPU in this process: JAX must not grab 75% of its memory up front. Read when
# the backend starts (first device use), so setting it at import time of this module is early enough.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Dense datasheet peaks per GPU, keyed by a substring of the device name (first match wins; PCIe before
# SXM because "H100" matches both). float32 = plain FP32 (no tensor cores), tf32 = tensor-core TF32.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bfloat16": 756e12, "tf32": 378e12, "float32": 51.2e12},
    "H100": {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},  # SXM
    "H200": {"bfloat16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
    "A100": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
}
PEAK_BYTES_PER_S: dict[str, float] = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


# ------------------------------------------------------------------------------------------------ timing


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median: differences between versions below this are noise."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s else float("nan")

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "spread": self.spread}


def jax_sync(out: Any) -> None:
    jax.block_until_ready(out)


def torch_sync(_out: Any = None) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(call: Callable[[int], Any], sync: Callable[[Any], None], *, warmup: int, repeats: int) -> Timing:
    """Median wall time of `call(i)` (i selects a rotating input set), each call synced before the clock stops."""
    for i in range(warmup):
        sync(call(i))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = call(warmup + i)
        sync(out)
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), repeats)


# ------------------------------------------------------------------------------------------- compilation


@dataclasses.dataclass
class Compiled:
    fn: Callable[..., Any]  # the compiled executable: call it with the same shapes it was lowered with
    flops: float | None  # XLA's count for one call
    bytes_accessed: float | None  # XLA's estimate (not a floor: intermediates included)
    compile_s: float
    attention: str  # "cudnn" when a cuDNN fused attention custom call is in the program, else "xla"


_COMPILER_OPTIONS: dict[str, Any] = {}


def set_fast_compile(on: bool) -> None:
    """Code checks at tiny sizes (`--fast-compile`): XLA's cheapest optimisation level and the rbg PRNG, whose
    dropout masks compile to one op instead of threefry's unrolled rounds. Never for measurements."""
    if not on:
        return
    _COMPILER_OPTIONS.update({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    jax.config.update("jax_default_prng_impl", "rbg")


def compile_with_cost(jitted: Any, *args: Any) -> Compiled:
    """Lower and compile `jitted` for `args`; XLA's cost analysis of the compiled program."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile(compiler_options=_COMPILER_OPTIONS or None)
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    try:
        hlo = compiled.as_text() or ""
    except Exception:  # noqa: BLE001 - some backends cannot print the optimised HLO
        hlo = ""
    attention = "cudnn" if "cudnn$fmha" in hlo or "__cudnn$fmha" in hlo else "xla"
    return Compiled(compiled, _num(cost.get("flops")), _num(cost.get("bytes accessed")), compile_s, attention)


def _num(x: Any) -> float | None:
    return None if x is None or x < 0 else float(x)


# ------------------------------------------------------------------------------------------ peaks, MFU


@dataclasses.dataclass(frozen=True)
class Peaks:
    flops: float | None  # FLOP/s for the run's precision
    bytes_per_s: float | None
    source: str  # "datasheet: <key>", "flag", "measured" or "none (CPU)"


def precision_key(dtype: str, fp32_matmul: str) -> str:
    if dtype == "bfloat16":
        return "bfloat16"
    return "tf32" if fp32_matmul == "tf32" else "float32"


def resolve_peaks(device_name: str, precision: str, peak_tflops: float | None, peak_gbs: float | None) -> Peaks:
    """Peak FLOP/s and bytes/s: from the flags, else from the datasheet table; None on a CPU (no MFU)."""
    flops = bw = None
    source = "none (CPU)"
    for key, table in PEAK_FLOPS.items():
        if key in device_name:
            flops, bw, source = table.get(precision), PEAK_BYTES_PER_S.get(key), f"datasheet: {key}"
            break
    if peak_tflops:
        flops, source = peak_tflops * 1e12, "flag"
    if peak_gbs:
        bw = peak_gbs * 1e9
    return Peaks(flops, bw, source)


def mfu(flops: float | None, seconds: float, peak_flops: float | None) -> float | None:
    """Achieved FLOP/s over peak; None without a peak (CPU) or a FLOP count."""
    if not flops or not peak_flops or seconds <= 0:
        return None
    return flops / seconds / peak_flops


def floor_s(flops: float | None, nbytes: float | None, peaks: Peaks) -> dict[str, float | None]:
    """The two floors (arithmetic, memory) and the larger of them; None where a peak is unknown."""
    t_flops = flops / peaks.flops if flops and peaks.flops else None
    t_bytes = nbytes / peaks.bytes_per_s if nbytes and peaks.bytes_per_s else None
    known = [t for t in (t_flops, t_bytes) if t is not None]
    return {"flops_s": t_flops, "bytes_s": t_bytes, "floor_s": max(known) if known else None,
            "bound": None if not known else ("compute" if (t_flops or 0) >= (t_bytes or 0) else "memory")}


def tree_bytes(tree: Any) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def measure_ceilings(dtype: str, *, on_gpu: bool) -> dict[str, float]:
    """Measured ceilings through JAX: a large matrix product (FLOP/s) and a device copy (bytes read + written)."""
    n = 8192 if on_gpu else 1024
    dt = jnp.dtype(dtype)
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), dt)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dt)
    mm = jax.jit(lambda x, y: x @ y)
    t_mm = time_calls(lambda i: mm(a, b), jax_sync, warmup=2, repeats=10)
    m = (1 << 28 if on_gpu else 1 << 24) // 4
    x = jax.random.normal(key, (m,), jnp.float32)
    copy = jax.jit(lambda v: v * 1.0 + 0.0)  # one read, one write
    t_cp = time_calls(lambda i: copy(x), jax_sync, warmup=2, repeats=10)
    return {"matmul_flops_per_s": 2 * n**3 / t_mm.median_s, "matmul_n": n,
            "copy_bytes_per_s": 2 * 4 * m / t_cp.median_s, "copy_bytes": 2 * 4 * m}


# ------------------------------------------------------------------------------------- precision, devices


def set_precision(fp32_matmul: str) -> None:
    """The same float32 matmul mode on both sides: 'highest' (true FP32) or 'tf32' (tensor cores)."""
    import torch

    jax.config.update("jax_default_matmul_precision", "highest" if fp32_matmul == "highest" else "tensorfloat32")
    tf32 = fp32_matmul == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def set_cpu_threads(n: int | None) -> None:
    """The same thread count for both sides on a CPU (XLA: one Eigen thread or its default). Call before
    the JAX backend starts."""
    if not n:
        return
    import torch

    torch.set_num_threads(n)
    if n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


def torch_device() -> str:
    """The torch device matching JAX's backend; refuses a GPU/CPU mismatch (ratios would mean nothing)."""
    import torch

    backend = jax.default_backend()
    has_cuda = torch.cuda.is_available()
    if backend == "gpu" and not has_cuda:
        raise SystemExit("JAX runs on a GPU but this torch has no CUDA: both sides must share the device")
    if backend == "cpu" and has_cuda:
        raise SystemExit("torch sees a GPU but JAX runs on the CPU: install jax[cuda] or hide the GPU")
    return "cuda" if backend == "gpu" else "cpu"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    import torch
    import transformers

    dev = jax.devices()[0]
    out = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "jax_backend": jax.default_backend(),
        "jax_device": dev.device_kind,
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "load_avg_1m": os.getloadavg()[0],
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    if torch.cuda.is_available():
        out["torch_device"] = torch.cuda.get_device_name(0)
    else:
        out["torch_device"] = f"cpu ({torch.get_num_threads()} threads)"
    return out


def device_name() -> str:
    """The accelerator's name for the peak table ('cpu' on a CPU)."""
    return "cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind


# --------------------------------------------------------------------------------------------- checks


def rel_diff(a: Any, b: Any) -> dict[str, float]:
    """||a - b|| / ||b|| and max|a - b| / max|b| (b the reference), in float64."""
    a = np.asarray(jnp.asarray(a, jnp.float32) if isinstance(a, jax.Array) else a, np.float64)
    b = np.asarray(b, np.float64)
    scale = max(float(np.abs(b).max()), 1e-30)
    return {"rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
            "max_rel": float(np.abs(a - b).max() / scale)}


class TorchStateSource(DictSource):
    """A torch state dict on any device for the converters; a tensor is copied to the host only when read."""

    def __init__(self, state: dict[str, Any], name: str = "<torch state dict>"):
        super().__init__(state, name=name)
        self._state = state

    def read(self, key: str) -> np.ndarray:
        return to_numpy(self._state[key].detach().cpu())


def torch_to_numpy(t: Any) -> np.ndarray:
    """A host float32 copy of a torch tensor (bfloat16 included)."""
    return t.detach().float().cpu().numpy()


# ---------------------------------------------------------------------------------------------- output


def fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain aligned table of `columns` (a row's missing or None values print as n/a)."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--fp32-matmul", choices=("highest", "tf32"), default="highest",
                   help="float32 matmul mode, set identically for JAX and torch (GPU only)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: 2 CPU, 5 GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default: 5 CPU, 20 GPU)")
    p.add_argument("--input-sets", type=int, default=2, help="distinct input sets rotated through")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the peak FLOP/s for MFU")
    p.add_argument("--peak-gbs", type=float, default=None, help="override the peak memory bandwidth (GB/s)")
    p.add_argument("--measure-ceilings", action="store_true", help="also time a big matmul and a copy")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="CPU only: threads for both sides (1 = single-threaded XLA and torch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every number to this JSON file (rewritten after each row)")
    p.add_argument("--deadline", type=float, default=None,
                   help="unix time: a row that would start with less than --reserve-s left is skipped")
    p.add_argument("--reserve-s", type=float, default=60.0, help="seconds a row needs at least (with --deadline)")
    p.add_argument("--fast-compile", action="store_true",
                   help="code checks only: cheapest XLA optimisation level and the rbg PRNG (compiles faster)")


def out_of_time(args: argparse.Namespace) -> bool:
    """True when `--deadline` leaves less than `--reserve-s` for the next row (it is then skipped, not run)."""
    return args.deadline is not None and time.time() > args.deadline - args.reserve_s


def timing_counts(args: argparse.Namespace) -> tuple[int, int]:
    on_gpu = jax.default_backend() == "gpu"
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 2)
    repeats = args.repeats if args.repeats is not None else (20 if on_gpu else 5)
    return warmup, repeats


def print_header(title: str, info: dict[str, Any], peaks: Peaks, shapes: dict[str, Any]) -> None:
    print(f"== {title}")
    print(f"   {info['date_utc']} (load avg {info['load_avg_1m']:.1f}) | "
          f"jax {info['versions']['jax']} on {info['jax_device']} | "
          f"torch {info['versions']['torch']} on {info['torch_device']} | cpu: {info['cpu']}")
    peak = "n/a" if peaks.flops is None else f"{peaks.flops / 1e12:.1f} TFLOP/s"
    bw = "n/a" if peaks.bytes_per_s is None else f"{peaks.bytes_per_s / 1e9:.0f} GB/s"
    print(f"   peak {peak}, {bw} ({peaks.source}) | shapes: {shapes}")
