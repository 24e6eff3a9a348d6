"""BLIP in JAX (aurora_jax, jit) vs transformers' `BlipForImageTextRetrieval` in PyTorch, same device, same process.

Cases (both sides compute the same function on the same random weights, converted torch -> JAX):
  itm    BLIP's eval path: ViT over the image, BERT with cross-attention to the image tokens, ITM head.
  train  one Aurora training step, forward + backward (no optimizer update). JAX: ITC + ITM with hard
         negatives (`tasks.retrieval.retrieval_loss`) through `peft.tuned_forward`, gradients w.r.t. the
         adapter and the trained heads only, frozen base. PyTorch (HF has no Aurora): the same ITC + ITM loss
         on the frozen HF model with requires_grad only on vision_proj, itm_head and the q/k/v (ViT qkv) biases
         of every layer -- a BitFit-style proxy, so autograd runs back through every layer as the adapter's
         backward does, without adapter FLOPs. Not the identical function: its loss_itc is checked, not grads.

Run from the repository root:  python -m bench.bench_blip --size tiny          (CPU smoke)
                               python -m bench.bench_blip --size base --dtype bfloat16   (GPU)
"""

from __future__ import annotations

import argparse
import re
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
DEFAULTS = {"tiny": (96, 8, 8, 8), "small": (224, 16, 16, 32), "base": (384, 64, 32, 64)}
VOCAB = 30524  # BLIP's BERT vocabulary with [DEC] and [ENC]
CLS, SEP, PAD = 101, 102, 0
TORCH_TRAINABLE = re.compile(
    r"^(vision_proj|itm_head)\.|self_attn\.qkv\.bias$|attention\.self\.(query|key|value)\.bias$")


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


def _soft_ce(logits: Any, targets: Any) -> Any:
    return -(logits.log_softmax(dim=1) * targets).sum(dim=1).mean()


def _draw(sim: Any, pos: Any, gen: Any) -> Any:
    import torch

    w = torch.softmax(sim.float(), dim=1) + 1e-4
    return torch.multinomial(w.masked_fill(pos, 0.0), 1, generator=gen).squeeze(1)


def torch_retrieval_loss(hf: Any, b: dict[str, Any], temp: float, enc_id: int, gen: Any) -> tuple[Any, Any]:
    """BLIP's ITC + ITM with hard negatives on the HF modules -> (loss, loss_itc)."""
    import torch
    import torch.nn.functional as F

    ids, mask = b["text_ids"], b["text_mask"]
    image = hf.vision_model(pixel_values=b["image"]).last_hidden_state
    text = hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    image_feat = F.normalize(hf.vision_proj(image[:, 0, :]), dim=-1)
    text_feat = F.normalize(hf.text_proj(text[:, 0, :]), dim=-1)
    sim = image_feat @ text_feat.t() / temp
    pos = b["image_index"][:, None] == b["image_index"][None, :]
    targets = pos.to(sim.dtype) / pos.sum(dim=1, keepdim=True)
    loss_itc = (_soft_ce(sim, targets) + _soft_ce(sim.t(), targets.t())) / 2
    enc_ids = ids.clone()
    enc_ids[:, 0] = enc_id
    with torch.no_grad():
        neg_text, neg_image = _draw(sim, pos, gen), _draw(sim.t(), pos.t(), gen)

    def cls(i: Any, m: Any, img: Any) -> Any:
        return hf.text_encoder(input_ids=i, attention_mask=m, encoder_hidden_states=img).last_hidden_state[:, 0]

    states = torch.cat([cls(enc_ids, mask, image), cls(enc_ids, mask, image[neg_image]),
                        cls(enc_ids[neg_text], mask[neg_text], image)])
    bsz = ids.shape[0]
    labels = torch.cat([torch.ones(bsz), torch.zeros(2 * bsz)]).long().to(ids.device)
    loss_itm = F.cross_entropy(hf.itm_head(states).float(), labels)
    return loss_itc + loss_itm, loss_itc


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


def torch_trainables(hf: Any) -> list[Any]:
    params = [p for n, p in hf.named_parameters() if TORCH_TRAINABLE.search(n)]
    for p in params:
        p.requires_grad_(True)
    return params


def run_train(args: argparse.Namespace, cfg: BlipConfig, params: dict, hf: Any, peaks: common.Peaks,
              sets: list[dict[str, np.ndarray]], device: str) -> dict[str, Any]:
    import torch

    warmup, repeats = common.timing_counts(args)
    peft_cfg = PeftConfig(rank=args.rank)
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
    tparams = torch_trainables(hf)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def torch_step(i: int) -> Any:
        for p in tparams:
            p.grad = None
        loss, _ = torch_retrieval_loss(hf, th[i % len(th)], cfg.temp, cfg.enc_token_id, gen)
        loss.backward()
        return loss

    t_torch = common.time_calls(torch_step, common.torch_sync, warmup=warmup, repeats=repeats)
    with torch.no_grad():
        _, ref_itc = torch_retrieval_loss(hf, th[0], cfg.temp, cfg.enc_token_id, gen)
    hf.requires_grad_(False)
    batch = sets[0]["text_ids"].shape
    nbytes = (common.tree_bytes(frozen) + 2 * common.tree_bytes(trainable)
              + sum(x.nbytes for x in jx[0].values()))
    out = row("train", args, batch[0], t_jax, t_torch, comp, train_flops(cfg, *batch), nbytes, peaks)
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
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: 8 tiny, 32 base)")
    p.add_argument("--text-len", type=int, default=35, help="padded text length (BLIP retrieval: 35)")
    p.add_argument("--rank", type=int, default=None, help="Aurora rank R (default: 8 tiny, 32 small, 64 base)")
    p.add_argument("--cases", nargs="+", choices=("itm", "train"), default=["itm", "train"])
    common.add_common_args(p)
    return p.parse_args(argv)


COLUMNS = ("case", "dtype", "batch", "jax_ms", "torch_ms", "jax_img_s", "torch_img_s", "ratio", "jax_mfu",
           "torch_mfu", "gflop_xla", "gflop_analytic", "mb_floor", "floor_ms", "bound", "jax_spread", "torch_spread",
           "attention")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    image_size, batch, train_batch, rank = DEFAULTS[args.size]
    image_size, batch = args.image_size or image_size, args.batch or batch
    train_batch, args.rank = args.train_batch or train_batch, args.rank or rank
    common.set_cpu_threads(args.cpu_threads)
    common.set_precision(args.fp32_matmul)
    device, info = common.torch_device(), common.describe()
    torch.manual_seed(args.seed)
    peaks = common.resolve_peaks(common.device_name(), common.precision_key(args.dtype, args.fp32_matmul),
                                 args.peak_tflops, args.peak_gbs)
    cfg = preset_config(args.size, task="retrieval", vocab_size=VOCAB, image_size=image_size)
    shapes = {"size": args.size, "image": image_size, "patch": cfg.vision.patch_size, "vit_tokens":
              cfg.vision.num_tokens, "d": cfg.vision.hidden_size, "layers": cfg.vision.num_layers,
              "text_len": args.text_len, "itm_batch": batch, "train_batch": train_batch, "rank": args.rank}
    common.print_header(f"BLIP {args.size}: JAX vs transformers, {args.dtype}", info, peaks, shapes)

    hf = make_hf_blip(cfg, device, args.seed)
    conv = convert_blip(common.TorchStateSource(hf.state_dict()), task="retrieval", config=cfg)
    params = jax.tree_util.tree_map(jnp.asarray, conv.params)
    if args.dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    rng = np.random.default_rng(args.seed)
    ceilings = common.measure_ceilings(args.dtype, on_gpu=device == "cuda") if args.measure_ceilings else None

    rows = []
    for case in args.cases:
        b = batch if case == "itm" else train_batch
        sets = [make_inputs(rng, b, image_size, args.text_len) for _ in range(args.input_sets)]
        run = run_itm if case == "itm" else run_train
        rows.append(run(args, cfg, params, hf, peaks, sets, device))
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
