"""LLaMA prefill and greedy decode in JAX (aurora_jax) vs transformers' `LlamaForCausalLM`, same device, same process.

Cases, per batch size (prompts of one length, no padding; random weights made in torch and converted):
  prefill  one forward over the prompt returning every position's logits (JAX jit vs HF forward).
  decode   greedy decoding with a KV cache: `aurora_jax.generate.generate` (prefill + lax.while_loop, one jit)
           vs `hf.generate(do_sample=False)`. Decode time = t(generate N new tokens) - t(generate 1), so
           tokens/s = B * (N - 1) / that difference; the prefill and call overheads cancel out.
  The greedy tokens of both sides are compared (random weights leave near-ties: a late mismatch in bfloat16
  is rounding, not a bug; float32 should agree).

Run from the repository root:  python -m bench.bench_llama                       (small random config, CPU)
                               python -m bench.bench_llama --size 7b --dtype bfloat16    (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.convert.llama import llama_keymap
from aurora_jax.generate import SamplingConfig, generate
from aurora_jax.models.llama import Llama, LlamaConfig, LlamaDecoder, abstract_params
from aurora_jax.peft import PeftConfig, combine, count_params, init_adapter, partition, tuned_apply
from aurora_jax.tasks.instruct import lm_loss
from bench import common

# HF config fields and (prompt length, new tokens) per size.
SIZES: dict[str, tuple[dict[str, int], int, int]] = {
    "tiny": (dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4), 32, 64),
    "small": (dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4), 128, 64),
    "7b": (dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32), 512, 128),
}
PAD = 0


# ------------------------------------------------------------------------------------------- FLOPs, bytes


def layer_matmul_params(cfg: LlamaConfig) -> int:
    d, hd = cfg.hidden_size, cfg.head_dim
    return d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size


def forward_flops(cfg: LlamaConfig, batch: int, tokens: int, context: int) -> float:
    """Matmul FLOPs of `tokens` new positions per sequence attending over `context` keys (as computed: the
    causal half is not subtracted), with the lm_head over every new position."""
    linear = cfg.num_layers * layer_matmul_params(cfg) + cfg.hidden_size * cfg.vocab_size
    attn = cfg.num_layers * 4 * tokens * context * cfg.num_heads * cfg.head_dim
    return batch * (2 * tokens * linear + attn)


def kv_bytes(cfg: LlamaConfig, batch: int, context: float, itemsize: int) -> float:
    return batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


# ------------------------------------------------------------------------------------------------ models


def make_hf_llama(fields: dict[str, int], dtype: str, device: str, seed: int) -> Any:
    """A random LlamaForCausalLM made on `device` in `dtype`; norm scales moved off 1 so a misplaced norm shows."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**fields, max_position_embeddings=4096, rms_norm_eps=1e-6,
                                      tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = None  # decode exactly N tokens
    model.generation_config.pad_token_id = PAD
    return model.eval().requires_grad_(False)


def convert(hf: Any, dtype: str, attention: str | None) -> tuple[LlamaConfig, dict]:
    cfg = LlamaConfig.from_hf(hf.config.to_dict(), dtype=dtype, attention_impl=attention)
    params = llama_keymap(cfg).convert(common.TorchStateSource(hf.state_dict()), abstract_params(cfg), dtype=dtype)
    return cfg, jax.tree_util.tree_map(jnp.asarray, params)


def make_prompts(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    return rng.integers(3, vocab, (batch, length)).astype(np.int32)


# ---------------------------------------------------------------------------------------------- timing


def time_jax_generate(cfg: LlamaConfig, params: dict, prompts: list[dict[str, jax.Array]], new: int,
                      warmup: int, repeats: int) -> tuple[common.Timing, float]:
    """Timing of `generate` with `new` tokens, and the wall time of its first (compiling) call."""
    scfg = SamplingConfig(max_new_tokens=new, pad_id=PAD)
    model = LlamaDecoder(cfg)

    def call(i: int) -> Any:
        return generate(model, params, prompts[i % len(prompts)], None, scfg).tokens

    first = common.time_calls(call, common.jax_sync, warmup=0, repeats=1).median_s
    return common.time_calls(call, common.jax_sync, warmup=max(warmup - 1, 0), repeats=repeats), first


def time_torch_generate(hf: Any, prompts: list[dict[str, Any]], new: int, warmup: int,
                        repeats: int) -> common.Timing:
    import torch

    def call(i: int) -> Any:
        p = prompts[i % len(prompts)]
        return hf.generate(**p, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=PAD)

    with torch.inference_mode():
        return common.time_calls(call, common.torch_sync, warmup=warmup, repeats=repeats)


def decode_time(tn: common.Timing, t1: common.Timing) -> tuple[float | None, bool]:
    """t(N) - t(1), None when not positive; True when it is within the timings' own spread (noise)."""
    delta = tn.median_s - t1.median_s
    noise = max(tn.max_s - tn.min_s, t1.max_s - t1.min_s)
    return (delta if delta > 0 else None), delta <= noise


def _per(x: float, t: float | None) -> float | None:
    return None if t is None else x / t


def token_agreement(ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Fraction of equal tokens and the first position where a row differs (None: all rows agree)."""
    diff = ours != ref
    first = [int(np.argmax(r)) for r in diff if r.any()]
    return {"equal_frac": float(1.0 - diff.mean()), "first_mismatch": min(first) if first else None}


# --------------------------------------------------------------------------------------------- cases


def run_prefill(args: argparse.Namespace, cfg: LlamaConfig, params: dict, hf: Any, peaks: common.Peaks,
                jx: list[dict], th: list[dict]) -> dict[str, Any]:
    import torch

    warmup, repeats = common.timing_counts(args)
    model = Llama(cfg)
    fn = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], attention_mask=b["attention_mask"]))
    comp = common.compile_with_cost(fn, params, jx[0])
    t_jax = common.time_calls(lambda i: comp.fn(params, jx[i % len(jx)]), common.jax_sync,
                              warmup=warmup, repeats=repeats)
    with torch.inference_mode():
        t_torch = common.time_calls(lambda i: hf(**th[i % len(th)]).logits, common.torch_sync,
                                    warmup=warmup, repeats=repeats)
        ref = common.torch_to_numpy(hf(**th[0]).logits)
    b, t = jx[0]["input_ids"].shape
    analytic = forward_flops(cfg, b, t, t)
    flops = comp.flops or analytic
    nbytes = common.tree_bytes(params) + b * t * 4 + b * t * cfg.vocab_size * 4  # weights, ids, f32 logits
    floor = common.floor_s(flops, nbytes, peaks)
    out = {
        "case": "prefill", "batch": b, "tokens": b * t, "jax_ms": t_jax.median_s * 1e3,
        "torch_ms": t_torch.median_s * 1e3, "jax_tok_s": b * t / t_jax.median_s,
        "torch_tok_s": b * t / t_torch.median_s, "ratio": t_torch.median_s / t_jax.median_s,
        "jax_mfu": common.mfu(flops, t_jax.median_s, peaks.flops),
        "torch_mfu": common.mfu(flops, t_torch.median_s, peaks.flops),
        "gflop_xla": None if comp.flops is None else comp.flops / 1e9, "gflop_analytic": analytic / 1e9,
        "mb_floor": nbytes / 1e6,
        "floor_ms": None if floor["floor_s"] is None else floor["floor_s"] * 1e3, "bound": floor["bound"],
        "jax_spread": t_jax.spread, "torch_spread": t_torch.spread, "compile_s": comp.compile_s,
        "attention": comp.attention,
    }
    out["check"] = common.rel_diff(comp.fn(params, jx[0]), ref)
    return out


def run_decode(args: argparse.Namespace, cfg: LlamaConfig, params: dict, hf: Any, peaks: common.Peaks,
               jx: list[dict], th: list[dict], new: int) -> dict[str, Any]:
    """Decode throughput from t(N new tokens) - t(1 new token) on both sides, and the greedy-token check."""
    b, t = jx[0]["input_ids"].shape
    w, r = args.gen_warmup, args.gen_repeats
    jn, compile_n = time_jax_generate(cfg, params, jx, new, w, r)
    j1, _ = time_jax_generate(cfg, params, jx, 1, w, r)
    tn, t1 = time_torch_generate(hf, th, new, w, r), time_torch_generate(hf, th, 1, w, r)
    steps = new - 1
    (dj, noisy_j), (dt, noisy_t) = decode_time(jn, j1), decode_time(tn, t1)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    context = t + new / 2  # average keys attended per step
    step_bytes = common.tree_bytes(params) + kv_bytes(cfg, b, context, itemsize)
    step_flops = forward_flops(cfg, b, 1, context)
    floor = common.floor_s(step_flops, step_bytes, peaks)
    bw = peaks.bytes_per_s
    out = {
        "case": "decode", "batch": b, "tokens": b * steps,
        "jax_ms": dj * 1e3 if dj else None, "torch_ms": dt * 1e3 if dt else None,
        "jax_tok_s": _per(b * steps, dj), "torch_tok_s": _per(b * steps, dt),
        "ratio": dt / dj if dj and dt else None,
        "jax_ms_step": dj / steps * 1e3 if dj else None, "torch_ms_step": dt / steps * 1e3 if dt else None,
        "jax_mbu": _per(step_bytes * steps, dj) / bw if bw and dj else None,
        "torch_mbu": _per(step_bytes * steps, dt) / bw if bw and dt else None,
        "noisy": {"jax": noisy_j, "torch": noisy_t},
        "gflop_analytic": step_flops * steps / 1e9, "mb_floor": step_bytes * steps / 1e6,
        "floor_ms": None if floor["floor_s"] is None else floor["floor_s"] * steps * 1e3, "bound": floor["bound"],
        "jax_spread": jn.spread, "torch_spread": tn.spread, "compile_s": compile_n,
        "e2e_jax_ms": jn.median_s * 1e3, "e2e_torch_ms": tn.median_s * 1e3,
    }
    out["check"] = greedy_check(cfg, params, hf, jx[0], th[0], new)
    return out


def greedy_check(cfg: LlamaConfig, params: dict, hf: Any, jx: dict, th: dict, new: int) -> dict[str, Any]:
    import torch

    ours = generate(LlamaDecoder(cfg), params, jx, None, SamplingConfig(max_new_tokens=new, pad_id=PAD)).tokens
    with torch.inference_mode():
        ref = hf.generate(**th, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=PAD)
    t = jx["input_ids"].shape[1]
    return token_agreement(np.asarray(ours), ref[:, t:].cpu().numpy())


# ----------------------------------------------------------------------------------------- LoRA training

LORA_TARGETS = ("q_proj", "v_proj")


def lora_train_flops(cfg: LlamaConfig, batch: int, length: int) -> float:
    """Useful matmul FLOPs of one frozen-base LoRA step: forward + the backward's activation gradients (2x the
    forward; no weight gradients of the base, LoRA's own are negligible). Remat's recomputation not counted."""
    return 2 * forward_flops(cfg, batch, length, length)


def jax_lora_step(cfg: LlamaConfig, peft_cfg: PeftConfig):
    """value_and_grad of the shifted causal-LM loss w.r.t. the LoRA tree; `cfg.remat` recomputes each block."""
    model = Llama(cfg)

    def loss_fn(trainable: dict, frozen: dict, batch: dict, rng: jax.Array):
        base, adapter = combine(trainable, frozen)
        logits = tuned_apply(model, base, adapter, peft_cfg, batch["input_ids"],
                             attention_mask=batch["attention_mask"], rng=rng, deterministic=False)
        return lm_loss(logits, batch["input_ids"])[0]

    return jax.jit(jax.value_and_grad(loss_fn))


def hf_lora(hf: Any, peft_cfg: PeftConfig, checkpointing: bool) -> Any:
    """transformers + peft: LoRA on q_proj/v_proj (same r, alpha, dropout), gradient checkpointing, train mode."""
    import peft

    model = peft.get_peft_model(hf, peft.LoraConfig(r=peft_cfg.lora_r, lora_alpha=peft_cfg.lora_alpha,
                                                    lora_dropout=peft_cfg.lora_dropout,
                                                    target_modules=list(LORA_TARGETS)))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def run_lora_train(args: argparse.Namespace, cfg: LlamaConfig, params: dict, hf: Any, peaks: common.Peaks,
                   ids: list[np.ndarray], device: str) -> dict[str, Any]:
    """One LoRA training step (forward + backward, no optimizer update): JAX (remat) vs HF + peft (gradient
    checkpointing), same weights, same tokens. LoRA B starts at 0 on both sides, so the losses must agree."""
    import torch

    warmup, repeats = common.timing_counts(args)
    peft_cfg = PeftConfig(method="lora", lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r, lora_targets=LORA_TARGETS)
    adapter = init_adapter(params, peft_cfg, jax.random.key(args.seed))
    trainable, frozen = partition(params, adapter, peft_cfg)
    step = jax_lora_step(dataclasses.replace(cfg, remat=not args.no_remat), peft_cfg)
    jx = [{"input_ids": jnp.asarray(x), "attention_mask": jnp.ones(x.shape, jnp.int32)} for x in ids]
    keys = [jax.random.fold_in(jax.random.key(args.seed + 1), i) for i in range(len(ids))]
    comp = common.compile_with_cost(step, trainable, frozen, jx[0], keys[0])
    t_jax = common.time_calls(lambda i: comp.fn(trainable, frozen, jx[i % len(jx)], keys[i % len(jx)]),
                              common.jax_sync, warmup=warmup, repeats=repeats)
    loss_jax = float(comp.fn(trainable, frozen, jx[0], keys[0])[0])

    th = [torch.from_numpy(x).long().to(device) for x in ids]
    model = hf_lora(hf, peft_cfg, checkpointing=not args.no_remat)
    tparams = [p for p in model.parameters() if p.requires_grad]
    try:
        def torch_step(i: int) -> Any:
            for p in tparams:
                p.grad = None
            x = th[i % len(th)]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            return loss

        t0 = time.perf_counter()
        loss_torch = float(torch_step(0).detach())
        first_s = time.perf_counter() - t0
        t_torch = common.time_calls(torch_step, common.torch_sync, warmup=max(warmup - 1, 0), repeats=repeats)
    finally:
        model.unload()  # the plain model back (LoRA layers removed), e.g. for later decode rows
        hf.eval().requires_grad_(False)
    b, t = ids[0].shape
    analytic = lora_train_flops(cfg, b, t)
    flops = comp.flops or analytic
    return {
        "case": "lora_train", "batch": b, "tokens": b * t, "jax_ms": t_jax.median_s * 1e3,
        "torch_ms": t_torch.median_s * 1e3, "jax_tok_s": b * t / t_jax.median_s,
        "torch_tok_s": b * t / t_torch.median_s, "ratio": t_torch.median_s / t_jax.median_s,
        "jax_mfu": common.mfu(flops, t_jax.median_s, peaks.flops),
        "torch_mfu": common.mfu(flops, t_torch.median_s, peaks.flops),
        "jax_mfu_model": common.mfu(analytic, t_jax.median_s, peaks.flops),
        "torch_mfu_model": common.mfu(analytic, t_torch.median_s, peaks.flops),
        "gflop_xla": None if comp.flops is None else comp.flops / 1e9, "gflop_analytic": analytic / 1e9,
        "jax_spread": t_jax.spread, "torch_spread": t_torch.spread, "compile_s": comp.compile_s,
        "torch_first_s": first_s, "attention": comp.attention, "remat": not args.no_remat,
        "trainable_params": {"jax": count_params(trainable), "torch": sum(p.numel() for p in tparams)},
        "check": {"loss_jax": loss_jax, "loss_torch": loss_torch,
                  **common.rel_diff(np.float32(loss_jax), np.float32(loss_torch))},
    }


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=None, help="default: 32 tiny, 128 small, 512 7b")
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 tiny, 64 small, 128 7b")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                   help="JAX attention implementation (auto: jax.nn.dot_product_attention chooses)")
    p.add_argument("--cases", nargs="+", choices=("prefill", "decode", "lora_train"), default=["prefill", "decode"])
    p.add_argument("--train-batch", type=int, default=None, help="LoRA train micro-batch (default: 4 on 7b, 2 else)")
    p.add_argument("--train-len", type=int, default=None, help="LoRA train sequence length (default: 2048 7b, 64 else)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--no-remat", action="store_true", help="LoRA train without remat / gradient checkpointing")
    p.add_argument("--gen-warmup", type=int, default=1, help="warm-up generate calls (each side, each length)")
    p.add_argument("--gen-repeats", type=int, default=3, help="timed generate calls (each side, each length)")
    common.add_common_args(p)
    return p.parse_args(argv)


COLUMNS = ("case", "batch", "tokens", "jax_ms", "torch_ms", "jax_tok_s", "torch_tok_s", "ratio", "jax_mfu",
           "torch_mfu", "jax_mbu", "torch_mbu", "gflop_xla", "gflop_analytic", "mb_floor", "floor_ms", "bound",
           "jax_spread", "torch_spread", "attention")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    fields, prompt_len, new = SIZES[args.size]
    prompt_len, new = args.prompt_len or prompt_len, args.new_tokens or new
    if new < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode time is t(N) - t(1))")
    common.set_cpu_threads(args.cpu_threads)
    common.set_fast_compile(args.fast_compile)
    common.set_precision(args.fp32_matmul)
    device, info = common.torch_device(), common.describe()
    peaks = common.resolve_peaks(common.device_name(), common.precision_key(args.dtype, args.fp32_matmul),
                                 args.peak_tflops, args.peak_gbs)
    shapes = {"size": args.size, **fields, "prompt_len": prompt_len, "new_tokens": new,
              "batch_sizes": args.batch_sizes}
    common.print_header(f"LLaMA {args.size}: JAX vs transformers, {args.dtype}", info, peaks, shapes)

    hf = make_hf_llama(fields, args.dtype, device, args.seed)
    cfg, params = convert(hf, args.dtype, None if args.attention == "auto" else args.attention)
    ceilings = common.measure_ceilings(args.dtype, on_gpu=device == "cuda") if args.measure_ceilings else None
    rng = np.random.default_rng(args.seed)
    rows = []
    for b in args.batch_sizes:
        ids = [make_prompts(rng, b, prompt_len, cfg.vocab_size) for _ in range(args.input_sets)]
        jx = [{"input_ids": jnp.asarray(x), "attention_mask": jnp.ones(x.shape, jnp.int32)} for x in ids]
        th = [{"input_ids": torch.from_numpy(x).long().to(device),
               "attention_mask": torch.ones(x.shape, dtype=torch.long, device=device)} for x in ids]
        if common.out_of_time(args):
            rows += [{"case": c, "dtype": args.dtype, "batch": b, "skipped": "time budget"}
                     for c in ("prefill", "decode") if c in args.cases]
            print(f"   b={b}: skipped (time budget)")
            continue
        if "prefill" in args.cases:
            rows.append({"dtype": args.dtype, **run_prefill(args, cfg, params, hf, peaks, jx, th)})
            print(f"   prefill b={b}: check {rows[-1]['check']} | compile {rows[-1]['compile_s']:.1f}s")
        if "decode" in args.cases:
            rows.append({"dtype": args.dtype, **run_decode(args, cfg, params, hf, peaks, jx, th, new)})
            r = rows[-1]
            print(f"   decode b={b}: greedy tokens {r['check']} | ms/step jax {common.fmt(r['jax_ms_step'])} "
                  f"torch {common.fmt(r['torch_ms_step'])} | decode time within noise {r['noisy']} | "
                  f"end-to-end ms jax {r['e2e_jax_ms']:.4g} torch {r['e2e_torch_ms']:.4g}")
        common.write_json(args.json, {"bench": "llama", "partial": True, "rows": rows})
    tb = args.train_batch or (4 if args.size == "7b" else 2)
    tl = args.train_len or (2048 if args.size == "7b" else 64)
    if "lora_train" in args.cases and common.out_of_time(args):
        rows.append({"case": "lora_train", "dtype": args.dtype, "batch": tb, "skipped": "time budget"})
        print("   lora_train: skipped (time budget)")
    elif "lora_train" in args.cases:
        ids = [make_prompts(rng, tb, tl, cfg.vocab_size) for _ in range(args.input_sets)]
        rows.append({"dtype": args.dtype, **run_lora_train(args, cfg, params, hf, peaks, ids, device)})
        r = rows[-1]
        print(f"   lora_train b={tb} len={tl}: check {r['check']} | compile {r['compile_s']:.1f}s | "
              f"trainable {r['trainable_params']}")
    if ceilings:
        print(f"   measured ceilings: {ceilings}")
    common.print_table(rows, COLUMNS)
    payload = {"bench": "llama", "args": vars(args), "device": info, "peaks": vars(peaks), "shapes": shapes,
               "ceilings": ceilings, "rows": rows}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
