"""BLIP in JAX (aurora_jax, jit) vs transformers' `BlipForImageTextRetrieval` in PyTorch, same device, same process.

Cases (both sides compute the same function on the same random weights, converted torch -> JAX):
  itm    BLIP's eval path: ViT over the image, BERT with cross-attention to the image tokens, ITM head.
  train  one Aurora training step, forward + backward (no optimizer update), the same function on both sides:
         ITC + ITM with hard negatives (plain softmax, positives masked) + ICE, Aurora's mode-approximation
         deltas (shared U/V/C, per-site factors, the release's dropout positions and fc1/fc2 reshapes) and GQT.
         JAX: `tasks.retrieval.retrieval_loss` through `peft.tuned_forward`, gradients w.r.t. the trainable tree
         (adapter + vision_proj + itm_head), frozen base. PyTorch: `bench.torch_aurora.TorchAurora` hooked into
         transformers' BlipForImageTextRetrieval, the same trainables, eager and (--torch-compile) torch.compile.
         The adapter weights are the same (copied JAX -> torch); the ITM negatives are sampled on each side.

Run from the repository root:  python -m bench.bench_blip --size tiny          (CPU smoke)
                               python -m bench.bench_blip --size base --dtype bfloat16   (GPU)
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.convert.blip import config_to_hf, convert_blip
from aurora_jax.models.bert import BertConfig
from aurora_jax.models.blip import Blip, BlipConfig, preset_config, with_compute
from aurora_jax.models.vit import ViTConfig
from aurora_jax.peft import (
    PeftConfig,
    combine,
    count_params,
    informative_context,
    init_adapter,
    partition,
    tuned_forward,
)
from aurora_jax.tasks.retrieval import retrieval_loss
from bench import common

# (image size, ITM batch, train batch, Aurora rank) per size; flags override. Base: BLIP's 384 px eval and
# retrieval fine-tuning batch per GPU, Aurora's rank 64. Tiny keeps R well under its width of 64.
DEFAULTS = {"micro": (32, 4, 4, 4), "tiny": (96, 8, 8, 8), "small": (224, 16, 16, 32), "base": (384, 64, 32, 64)}
VOCAB = 30524  # BLIP's BERT vocabulary with [DEC] and [ENC]
CLS, SEP, PAD = 101, 102, 0


# ------------------------------------------------------------------------------------------- FLOPs


def vit_flops(v: ViTConfig, images: int) -> float:
    """Matmul FLOPs of the ViT forward (patch conv, qkv, proj, MLP, QK^T and AV)."""
    n, d, m = v.num_tokens, v.hidden_size, v.mlp_dim
    patch = 2 * (n - 1) * 3 * v.patch_size**2 * d
    layer = 2 * n * d * (4 * d + 2 * m) + 4 * n * n * d
    return images * (patch + v.num_layers * layer)


def bert_flops(t: BertConfig, seqs: int, length: int, image_tokens: int = 0, image_width: int = 0) -> float:
    """Matmul FLOPs of the BERT forward; with image_tokens > 0 every layer also cross-attends to them."""
    d, m, T = t.hidden_size, t.intermediate_size, length
    layer = 2 * T * d * 4 * d + 4 * T * T * d + 2 * 2 * T * d * m
    if image_tokens:
        layer += 2 * 2 * T * d * d + 2 * 2 * image_tokens * image_width * d + 4 * T * image_tokens * d
    return seqs * t.num_layers * layer


def itm_flops(cfg: BlipConfig, batch: int, length: int) -> float:
    n, dv = cfg.vision.num_tokens, cfg.vision.hidden_size
    return vit_flops(cfg.vision, batch) + bert_flops(cfg.text, batch, length, n, dv)


def train_flops(cfg: BlipConfig, batch: int, length: int) -> float:
    """Forward (ViT, unimodal BERT, 3 multimodal BERT passes) x 2: a frozen base's backward needs only the
    activation gradients (about the forward's matmuls again), no weight gradients. Adapter FLOPs left out."""
    n, dv = cfg.vision.num_tokens, cfg.vision.hidden_size
    fwd = (vit_flops(cfg.vision, batch) + bert_flops(cfg.text, batch, length)
           + bert_flops(cfg.text, 3 * batch, length, n, dv))
    return 2 * fwd


# ------------------------------------------------------------------------------------------ models


def randomize_(model: Any, seed: int) -> None:
    """Every weight random (norm scales near 1), so no all-ones norm or zero bias hides a swapped tensor."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.device)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)


def make_hf_blip(cfg: BlipConfig, device: str, seed: int) -> Any:
    import torch
    import transformers

    d = config_to_hf(cfg)
    hcfg = transformers.BlipConfig(vision_config=d["vision_config"], text_config=d["text_config"],
                                   image_text_hidden_size=d["image_text_hidden_size"])
    with torch.device(device):
        model = transformers.BlipForImageTextRetrieval(hcfg)
    randomize_(model, seed)
    return model.eval().requires_grad_(False)


def bench_config(size: str, image_size: int) -> BlipConfig:
    """The BLIP of a size; "micro" (width 32, one layer each, patch 16) only exercises the code in tests."""
    if size != "micro":
        return preset_config(size, task="retrieval", vocab_size=VOCAB, image_size=image_size)
    vision = ViTConfig(image_size=image_size, patch_size=16, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=128)
    text = BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=128,
                      max_position_embeddings=64, encoder_width=32)
    return BlipConfig(vision=vision, text=text, task="retrieval", embed_dim=16)


def cast_tree(tree: Any, dtype: str) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), tree)


# ------------------------------------------------------------------------------------------ inputs


def make_inputs(rng: np.random.Generator, batch: int, image_size: int, text_len: int) -> dict[str, np.ndarray]:
    """Random pixels (B, H, W, 3), [CLS] ... [SEP] texts of random length padded to text_len, unique images."""
    lengths = rng.integers(max(3, text_len // 2), text_len + 1, batch)
    ids = np.full((batch, text_len), PAD, np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.concatenate([[CLS], rng.integers(1000, 30000, n - 2), [SEP]])
    return {"image": rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32),
            "text_ids": ids, "text_mask": (ids != PAD).astype(np.int32),
            "image_index": np.arange(batch, dtype=np.int32)}


def to_jax(inputs: dict[str, np.ndarray], dtype: str) -> dict[str, jax.Array]:
    out = {k: jnp.asarray(v) for k, v in inputs.items()}
    out["image"] = out["image"].astype(jnp.dtype(dtype))
    return out


def to_torch(inputs: dict[str, np.ndarray], dtype: str, device: str) -> dict[str, Any]:
    import torch

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return {"image": torch.from_numpy(inputs["image"].transpose(0, 3, 1, 2).copy()).to(device, tdt),
            "text_ids": torch.from_numpy(inputs["text_ids"]).long().to(device),
            "text_mask": torch.from_numpy(inputs["text_mask"]).long().to(device),
            "image_index": torch.from_numpy(inputs["image_index"]).long().to(device)}


# ------------------------------------------------------------------------------------- torch side


def torch_itm(hf: Any, b: dict[str, Any]) -> Any:
    """`BlipForImageTextRetrieval.forward(use_itm_head=True)` step by step (its image mask is made on the CPU)."""
    image = hf.vision_model(pixel_values=b["image"]).last_hidden_state
    h = hf.text_encoder(input_ids=b["text_ids"], attention_mask=b["text_mask"],
                        encoder_hidden_states=image).last_hidden_state
    return hf.itm_head(h[:, 0, :])


# --------------------------------------------------------------------------------------- the cases


def row(case: str, args: argparse.Namespace, batch: int, t_jax: common.Timing, t_torch: common.Timing,
        comp: common.Compiled, analytic: float, nbytes: float, peaks: common.Peaks) -> dict[str, Any]:
    """One result row: throughputs, ratio (JAX / torch throughput, > 1 = JAX faster), MFU, floors."""
    flops = comp.flops or analytic
    floor = common.floor_s(flops, nbytes, peaks)
    return {
        "case": case, "dtype": args.dtype, "batch": batch,
        "jax_ms": t_jax.median_s * 1e3, "torch_ms": t_torch.median_s * 1e3,
        "jax_img_s": batch / t_jax.median_s, "torch_img_s": batch / t_torch.median_s,
        "ratio": t_torch.median_s / t_jax.median_s,
        "jax_mfu": common.mfu(flops, t_jax.median_s, peaks.flops),
        "torch_mfu": common.mfu(flops, t_torch.median_s, peaks.flops),
        "gflop_xla": None if comp.flops is None else comp.flops / 1e9, "gflop_analytic": analytic / 1e9,
        "mb_floor": nbytes / 1e6, "floor_ms": None if floor["floor_s"] is None else floor["floor_s"] * 1e3,
        "bound": floor["bound"], "jax_spread": t_jax.spread, "torch_spread": t_torch.spread,
        "compile_s": comp.compile_s, "attention": comp.attention,
    }


def run_itm(args: argparse.Namespace, cfg: BlipConfig, params: dict, hf: Any, peaks: common.Peaks,
            sets: list[dict[str, np.ndarray]], device: str) -> dict[str, Any]:
    import torch

    warmup, repeats = common.timing_counts(args)
    model = Blip(with_compute(cfg, args.dtype))
    params = cast_tree(params, args.dtype)
    fn = jax.jit(lambda p, b: model.apply({"params": p}, b["image"], b["text_ids"], b["text_mask"],
                                          method=Blip.itm))
    jx = [{k: v for k, v in to_jax(s, args.dtype).items() if k != "image_index"} for s in sets]
    th = [to_torch(s, args.dtype, device) for s in sets]
    comp = common.compile_with_cost(fn, params, jx[0])
    t_jax = common.time_calls(lambda i: comp.fn(params, jx[i % len(jx)]), common.jax_sync,
                              warmup=warmup, repeats=repeats)
    with torch.inference_mode():
        t_torch = common.time_calls(lambda i: torch_itm(hf, th[i % len(th)]), common.torch_sync,
                                    warmup=warmup, repeats=repeats)
        ref = common.torch_to_numpy(torch_itm(hf, th[0]))
    batch = sets[0]["text_ids"].shape
    nbytes = common.tree_bytes(params) + sum(x.nbytes for x in jx[0].values()) + batch[0] * 2 * 4
    out = row("itm", args, batch[0], t_jax, t_torch, comp, itm_flops(cfg, *batch), nbytes, peaks)
    out["check"] = common.rel_diff(comp.fn(params, jx[0]), ref)
    return out


def jax_train_step(cfg: BlipConfig, peft_cfg: PeftConfig, dtype: str):
    """value_and_grad of the Aurora retrieval loss w.r.t. the trainable tree (the frozen tree is an argument)."""
    model = Blip(with_compute(cfg, dtype))
    ice = partial(informative_context, weight=peft_cfg.ice_weight) if peft_cfg.ice else None

    def loss_fn(trainable: dict, frozen: dict, batch: dict, rng: jax.Array):
        drop_key, task_key = jax.random.split(rng)
        base, adapter = combine(trainable, frozen)
        fwd = tuned_forward(model, base, adapter, peft_cfg, rng=drop_key, deterministic=False)
        return retrieval_loss(fwd, batch, task_key, temp=base["temp"], enc_token_id=cfg.enc_token_id, ice=ice)

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def torch_train_side(hf: Any, cfg: BlipConfig, peft_cfg: PeftConfig, adapter: dict) -> tuple[Any, list[Any]]:
    """Aurora (the JAX adapter's weights) hooked into `hf` in training mode -> (TorchAurora, trainables)."""
    from bench.torch_aurora import TorchAurora, trainable_parameters

    aurora = TorchAurora(hf, peft_cfg.rank, dropout=peft_cfg.dropout, core=peft_cfg.core, gqt=peft_cfg.gqt,
                         gqt_weight=peft_cfg.gqt_weight).load_jax(adapter)
    aurora.handles = aurora.attach(hf)
    hf.train()
    aurora.train()
    return aurora, trainable_parameters(hf, aurora)


def torch_step_fn(hf: Any, cfg: BlipConfig, peft_cfg: PeftConfig, params: list[Any], gen: Any,
                  compile_mode: str | None) -> Any:
    """step(batch) -> loss: zero the grads, forward (eager or torch.compile'd), backward."""
    import torch

    from bench.torch_aurora import torch_retrieval_loss

    ice = peft_cfg.ice_weight if peft_cfg.ice else None

    def loss_fn(b: dict[str, Any]) -> Any:
        return torch_retrieval_loss(hf, b, temp=cfg.temp, enc_token_id=cfg.enc_token_id, gen=gen,
                                    ice_weight=ice)["loss"]

    # dynamic=False: each batch size gets its own static-shape graph, as each gets its own XLA program
    backend = {} if compile_mode == "default" else {"backend": compile_mode}
    fwd = loss_fn if compile_mode is None else torch.compile(loss_fn, dynamic=False, **backend)

    def step(b: dict[str, Any]) -> Any:
        for p in params:
            p.grad = None
        loss = fwd(b)
        loss.backward()
        return loss

    return step


def run_train(args: argparse.Namespace, cfg: BlipConfig, params: dict, hf: Any, peaks: common.Peaks,
              sets: list[dict[str, np.ndarray]], device: str) -> dict[str, Any]:
    """JAX vs torch eager (and torch.compile when args.torch_compile is set) on one Aurora training step."""
    import torch

    warmup, repeats = common.timing_counts(args)
    peft_cfg = PeftConfig(rank=args.rank, dropout=args.adapter_dropout)
    adapter = init_adapter(params, peft_cfg, jax.random.key(args.seed))
    trainable, frozen = partition(params, adapter, peft_cfg)
    frozen = cast_tree(frozen, args.dtype)  # frozen base stored in the compute dtype; trainables stay float32
    step = jax_train_step(cfg, peft_cfg, args.dtype)
    jx = [to_jax(s, args.dtype) for s in sets]
    keys = [jax.random.fold_in(jax.random.key(args.seed + 1), i) for i in range(len(sets))]
    comp = common.compile_with_cost(step, trainable, frozen, jx[0], keys[0])
    t_jax = common.time_calls(lambda i: comp.fn(trainable, frozen, jx[i % len(jx)], keys[i % len(jx)]),
                              common.jax_sync, warmup=warmup, repeats=repeats)
    (_, metrics), _ = comp.fn(trainable, frozen, jx[0], keys[0])

    th = [to_torch(s, args.dtype, device) for s in sets]
    aurora, tparams = torch_train_side(hf, cfg, peft_cfg, adapter)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    try:
        eager = torch_step_fn(hf, cfg, peft_cfg, tparams, gen, None)
        t_torch = common.time_calls(lambda i: eager(th[i % len(th)]), common.torch_sync,
                                    warmup=warmup, repeats=repeats)
        compiled = None
        if args.torch_compile:
            import time

            fn = torch_step_fn(hf, cfg, peft_cfg, tparams, gen, args.torch_compile)
            t0 = time.perf_counter()
            common.torch_sync(fn(th[0]))  # compiles forward and backward
            compile_s = time.perf_counter() - t0
            compiled = (common.time_calls(lambda i: fn(th[i % len(th)]), common.torch_sync,
                                          warmup=max(warmup - 1, 0), repeats=repeats), compile_s)
        with torch.no_grad():
            from bench.torch_aurora import torch_retrieval_loss

            ref_itc = torch_retrieval_loss(hf, th[0], temp=cfg.temp, enc_token_id=cfg.enc_token_id,
                                           gen=gen)["loss_itc"]
    finally:
        for h in aurora.handles:
            h.remove()
        hf.eval().requires_grad_(False)
    batch = sets[0]["text_ids"].shape
    nbytes = (common.tree_bytes(frozen) + 2 * common.tree_bytes(trainable)
              + sum(x.nbytes for x in jx[0].values()))
    out = row("train", args, batch[0], t_jax, t_torch, comp, train_flops(cfg, *batch), nbytes, peaks)
    if compiled is not None:
        t_c, compile_s = compiled
        flops = comp.flops or train_flops(cfg, *batch)
        out.update({"torch_compile_ms": t_c.median_s * 1e3, "torch_compile_img_s": batch[0] / t_c.median_s,
                    "ratio_compile": t_c.median_s / t_jax.median_s,
                    "torch_compile_mfu": common.mfu(flops, t_c.median_s, peaks.flops),
                    "torch_compile_spread": t_c.spread, "torch_compile_s": compile_s,
                    "torch_compile_mode": args.torch_compile})
    # adapter dropout on both sides: loss_itc differs by the dropout masks (exact with --adapter-dropout 0)
    out["check"] = {"loss_itc_jax": float(metrics["loss_itc"]), "loss_itc_torch": float(ref_itc),
                    **common.rel_diff(np.asarray(metrics["loss_itc"], np.float32), ref_itc.float().cpu().numpy())}
    out["trainable_params"] = {"jax": count_params(trainable), "torch": sum(p.numel() for p in tparams)}
    return out


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(DEFAULTS), default="tiny")
    p.add_argument("--image-size", type=int, default=None, help="default: 96 tiny, 224 small, 384 base")
    p.add_argument("--batch", type=int, default=None, help="ITM batch (default: 8 tiny, 64 base)")
    p.add_argument("--train-batch", type=int, nargs="+", default=None,
                   help="training batch sizes, one train row each (default: 8 tiny, 32 base)")
    p.add_argument("--text-len", type=int, default=35, help="padded text length (BLIP retrieval: 35)")
    p.add_argument("--rank", type=int, default=None, help="Aurora rank R (default: 8 tiny, 32 small, 64 base)")
    p.add_argument("--cases", nargs="+", choices=("itm", "train"), default=["itm", "train"])
    p.add_argument("--adapter-dropout", type=float, default=0.1, help="Aurora dropout, both sides (release: 0.1)")
    p.add_argument("--torch-compile", default=None, metavar="MODE",
                   help="also time the torch step under torch.compile: 'default' (inductor) or a backend name "
                        "('aot_eager' for a quick CPU check)")
    common.add_common_args(p)
    return p.parse_args(argv)


COLUMNS = ("case", "dtype", "batch", "jax_ms", "torch_ms", "torch_compile_ms", "jax_img_s", "torch_img_s",
           "torch_compile_img_s", "ratio", "ratio_compile", "jax_mfu", "torch_mfu", "torch_compile_mfu", "gflop_xla",
           "gflop_analytic", "mb_floor", "floor_ms", "bound", "jax_spread", "torch_spread", "attention")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    image_size, batch, train_batch, rank = DEFAULTS[args.size]
    image_size, batch = args.image_size or image_size, args.batch or batch
    train_batches, args.rank = args.train_batch or [train_batch], args.rank or rank
    common.set_cpu_threads(args.cpu_threads)
    common.set_fast_compile(args.fast_compile)
    common.set_precision(args.fp32_matmul)
    device, info = common.torch_device(), common.describe()
    torch.manual_seed(args.seed)
    peaks = common.resolve_peaks(common.device_name(), common.precision_key(args.dtype, args.fp32_matmul),
                                 args.peak_tflops, args.peak_gbs)
    cfg = bench_config(args.size, image_size)
    shapes = {"size": args.size, "image": image_size, "patch": cfg.vision.patch_size, "vit_tokens":
              cfg.vision.num_tokens, "d": cfg.vision.hidden_size, "layers": cfg.vision.num_layers,
              "text_len": args.text_len, "itm_batch": batch, "train_batch": train_batches, "rank": args.rank}
    common.print_header(f"BLIP {args.size}: JAX vs transformers, {args.dtype}", info, peaks, shapes)

    hf = make_hf_blip(cfg, device, args.seed)
    conv = convert_blip(common.TorchStateSource(hf.state_dict()), task="retrieval", config=cfg)
    params = jax.tree_util.tree_map(jnp.asarray, conv.params)
    if args.dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    rng = np.random.default_rng(args.seed)
    ceilings = common.measure_ceilings(args.dtype, on_gpu=device == "cuda") if args.measure_ceilings else None

    rows = []
    for case, b in [("itm", batch)] * ("itm" in args.cases) + [("train", tb) for tb in train_batches
                                                                  if "train" in args.cases]:
        if common.out_of_time(args):
            rows.append({"case": case, "dtype": args.dtype, "batch": b, "skipped": "time budget"})
            print(f"   {case} b={b}: skipped (time budget)")
            continue
        sets = [make_inputs(rng, b, image_size, args.text_len) for _ in range(args.input_sets)]
        run = run_itm if case == "itm" else run_train
        rows.append(run(args, cfg, params, hf, peaks, sets, device))
        common.write_json(args.json, {"bench": "blip", "partial": True, "rows": rows})
        print(f"   {case}: check {rows[-1]['check']} | compile {rows[-1]['compile_s']:.1f}s"
              + (f" | trainable {rows[-1]['trainable_params']}" if case == "train" else ""))
    if ceilings:
        print(f"   measured ceilings: {ceilings}")
    common.print_table(rows, COLUMNS)
    payload = {"bench": "blip", "args": vars(args), "device": info, "peaks": vars(peaks), "shapes": shapes,
               "ceilings": ceilings, "rows": rows}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
