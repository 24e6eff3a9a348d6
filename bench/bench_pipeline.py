"""Input pipeline rate: images/s per CPU core of BLIP's 384 px training transform, and the host cores a GPU needs.

What runs is the project's own path: `aurora_jax.data.pipeline.make_dataset` (grain) over a list of records
holding JPEG bytes, with `image_fn` = the default training transform (`transforms.decode_image`, then
`train_transform`: random resized crop (bicubic), horizontal flip, RandAugment(2, 5), CLIP normalisation),
batched. Workers: 0 = in the calling process (grain's read threads), N > 0 = `mp_prefetch` with N worker
processes. CPU time is summed over this process and its live children (read from /proc), so
"img/s per core" = images / CPU seconds, whatever else runs on the machine; wall img/s is printed too.

The stage profile times each step of the transform alone (CPU time per image, in-process).

The images are synthetic JPEGs of COCO's typical size (640 x 480, quality 90, about 175 kB: smooth colour
fields plus noise, so they compress like photographs rather than like pure noise). Real images differ in
size; pass --width/--height to see the effect.

Run from the repository root:  python -m bench.bench_pipeline [--workers 0 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from aurora_jax.data import transforms as T

TARGET_IMG_S = 1400.0  # a BLIP-base Aurora training step on one H100/H200 class GPU (images per second)


def synthetic_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photograph-like JPEG: smooth colour gradients and waves plus pixel noise."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / r.uniform(20, 80) + r.uniform(0, 6)) * 80 + 120,
                     np.cos(y / r.uniform(20, 80) + r.uniform(0, 6)) * 80 + 120,
                     (x + y) / (width + height) * 200 + 20], -1)
    pixels = np.clip(base + r.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_source(n: int, distinct: int, width: int, height: int) -> list[dict[str, Any]]:
    """n records cycling over `distinct` encoded images (image bytes + image_index)."""
    jpegs = [synthetic_jpeg(width, height, seed) for seed in range(distinct)]
    return [{"image": jpegs[i % distinct], "image_index": i} for i in range(n)]


# ------------------------------------------------------------------------------------------ CPU time


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process from /proc (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def tree_cpu_s() -> float:
    """CPU seconds of this process and every live descendant (grain's worker processes)."""
    if not os.path.isdir("/proc"):
        return time.process_time()
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += _proc_cpu_s(pid)
        todo += _children(pid)
    return total


# -------------------------------------------------------------------------------------------- stages


def stage_profile(jpegs: list[bytes], size: int, repeats: int) -> dict[str, float]:
    """CPU ms per image of each step of the training transform alone, and of the whole (decode + transform)."""
    rng = np.random.default_rng(0)
    imgs = [T.decode_image(d) for d in jpegs]
    crops = [T.random_resized_crop(im, size, rng) for im in imgs]
    n = len(jpegs)

    def ms(fn: Callable[[int], Any]) -> float:
        t0 = time.process_time()
        for i in range(repeats):
            fn(i % n)
        return (time.process_time() - t0) / repeats * 1e3

    return {
        "decode": ms(lambda i: T.decode_image(jpegs[i])),
        "random_resized_crop": ms(lambda i: T.random_resized_crop(imgs[i], size, rng)),
        "flip": ms(lambda i: T.random_horizontal_flip(crops[i], rng)),
        "rand_augment": ms(lambda i: T.rand_augment(crops[i], rng)),
        "normalize": ms(lambda i: T.normalize(crops[i])),
        "decode+train_transform": ms(lambda i: T.train_transform(T.decode_image(jpegs[i]), size, rng)),
    }


def op_profile(jpegs: list[bytes], size: int, repeats: int) -> dict[str, float]:
    """CPU ms of each RandAugment op at magnitude 5 on a `size` crop."""
    rng = np.random.default_rng(1)
    crops = [T.random_resized_crop(T.decode_image(d), size, rng) for d in jpegs]
    out = {}
    for name, op in T.RANDAUG_OPS.items():
        t0 = time.process_time()
        for i in range(repeats):
            op(crops[i % len(crops)], 5, rng)
        out[name] = (time.process_time() - t0) / repeats * 1e3
    return out


# --------------------------------------------------------------------------------------------- grain


def grain_rate(source: list[dict[str, Any]], *, workers: int, threads: int, batch: int, size: int,
               batches: int) -> dict[str, float]:
    """Wall img/s and img/s per CPU core of `make_dataset` (train transform) with `workers` processes."""
    import grain

    from aurora_jax.data.examples import image_example
    from aurora_jax.data.pipeline import make_dataset

    ds = make_dataset(source, image_example(), batch_size=batch, image_size=size, train=True, seed=0,
                      shard_index=0, shard_count=1, read_options=grain.ReadOptions(num_threads=threads))
    if workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; a plain script has none
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    it = iter(ds)
    first = next(it)  # start-up (worker processes, first reads) stays out
    assert first["image"].shape == (batch, size, size, 3) and first["image"].dtype == np.float32
    cpu0, t0 = tree_cpu_s(), time.perf_counter()
    for _ in range(batches):
        next(it)
    wall, cpu = time.perf_counter() - t0, tree_cpu_s() - cpu0
    del it
    images = batches * batch
    per_core = images / cpu if cpu > 0 else float("nan")
    return {"workers": workers, "threads": threads, "images": images, "wall_s": wall, "cpu_s": cpu,
            "img_s": images / wall, "img_s_per_core": per_core, "cores_for_target": TARGET_IMG_S / per_core}


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=384, help="output image size (BLIP retrieval: 384)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--distinct", type=int, default=32, help="distinct JPEGs the records cycle over")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="grain read threads per process (make_dataset: 4)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="timed batches per worker setting")
    p.add_argument("--repeats", type=int, default=64, help="calls per stage in the stage profile")
    p.add_argument("--no-stages", action="store_true", help="skip the stage profile")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0],
            "python": platform.python_version(), "pillow": Image.__version__, "numpy": np.__version__}
    source = make_source(args.batch * (args.batches + 2) * max(1, max(args.workers)), args.distinct,
                         args.width, args.height)
    jpegs = [r["image"] for r in source[:args.distinct]]
    kb = float(np.mean([len(j) for j in jpegs]) / 1e3)
    print(f"== BLIP train transform at {args.size} px on {args.width}x{args.height} JPEGs ({kb:.0f} kB), "
          f"{info['date_utc']}, {info['cpu_count']} cores, load avg {info['load_avg_1m_start']:.2f}")
    payload: dict[str, Any] = {"bench": "pipeline", "args": vars(args), "info": info, "jpeg_kb": kb,
                               "target_img_s": TARGET_IMG_S}
    if not args.no_stages:
        payload["stages_ms"] = stage_profile(jpegs, args.size, args.repeats)
        payload["randaug_ops_ms"] = op_profile(jpegs, args.size, max(8, args.repeats // 4))
        print("   stage CPU ms/image: " + ", ".join(f"{k} {v:.2f}" for k, v in payload["stages_ms"].items()))
        print("   RandAugment op CPU ms (applied): "
              + ", ".join(f"{k} {v:.2f}" for k, v in payload["randaug_ops_ms"].items()))
    rows = []
    for w in args.workers:
        rows.append(grain_rate(source, workers=w, threads=args.threads, batch=args.batch, size=args.size,
                               batches=args.batches))
        r = rows[-1]
        print(f"   grain workers={w} threads={args.threads}: {r['img_s']:.1f} img/s wall, "
              f"{r['img_s_per_core']:.1f} img/s per core ({r['cpu_s']:.2f} CPU s for {r['images']} images) "
              f"-> {r['cores_for_target']:.1f} cores for {TARGET_IMG_S:.0f} img/s")
    payload["rows"] = rows
    info["load_avg_1m_end"] = os.getloadavg()[0]
    best = max(r["img_s_per_core"] for r in rows)
    payload["cores_for_target"] = TARGET_IMG_S / best
    print(f"   a GPU step at {TARGET_IMG_S:.0f} img/s needs {TARGET_IMG_S / best:.1f} host cores "
          f"(best per-core rate {best:.1f} img/s; load avg at the end {info['load_avg_1m_end']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
