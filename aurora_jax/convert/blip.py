"""BLIP checkpoints -> our params: HF transformers folders and original Salesforce `.pth` files.

One key map, written against HF transformers' names. Salesforce checkpoints are read through
`salesforce_to_hf`, a rename of their keys into HF's layout (momentum copies go under `momentum.`),
so both sources share the map. The same map runs backwards to export HF state dicts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from aurora_jax.convert import keymap as km
from aurora_jax.convert.cli import base_parser
from aurora_jax.convert.readers import RenamedSource, TensorSource, open_checkpoint
from aurora_jax.convert.store import save_converted
from aurora_jax.models.bert import BertConfig
from aurora_jax.models.blip import TASKS, BlipConfig, abstract_params
from aurora_jax.models.vit import ViTConfig

HF_ARCHITECTURES = {
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
    "caption": "BlipForConditionalGeneration",
}
# Parts of the retrieval model that BLIP keeps a momentum (EMA) copy of.
MOMENTUM_PARTS = ("visual_encoder", "text_encoder", "vision_proj", "text_proj")
QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr")
BLIP_TEMP_REASON = "HF BLIP retrieval checkpoints have no ITC temperature; BLIP initialises it to 0.07"
# BLIP's tokenizer appends [DEC] then [ENC] to BERT's vocabulary.
ENC_AFTER_BOS = 1


# ------------------------------------------------------------------------------------------- renames

# Salesforce top-level module -> HF prefix. Momentum copies keep HF's inner names under "momentum.".
_SF_PREFIXES = {
    "visual_encoder": "vision_model",
    "visual_encoder_m": "momentum.vision_model",
    "text_encoder_m": "momentum.text_encoder",
    "vision_proj_m": "momentum.vision_proj",
    "text_proj_m": "momentum.text_proj",
}
# timm-style ViT names (after the module prefix) -> HF BlipVisionModel names.
_SF_VIT_RENAMES = (
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
)


def salesforce_to_hf(key: str) -> str:
    """A Salesforce BLIP state-dict key in HF transformers' naming (text keys already agree).

    Keys without an HF counterpart keep their name: `temp`, the queues, and anything unknown (so it
    shows up as unexpected rather than vanishing).
    """
    head, _, rest = key.partition(".")
    if head not in _SF_PREFIXES:
        return key
    prefix = _SF_PREFIXES[head]
    if head.startswith("visual_encoder"):
        for pattern, repl in _SF_VIT_RENAMES:
            if re.fullmatch(pattern, rest):
                return f"{prefix}.{re.sub(pattern, repl, rest)}"
        return f"{prefix}.{rest}"
    return f"{prefix}.{rest}" if rest else prefix


def is_salesforce(keys: Sequence[str]) -> bool:
    return any(k.startswith("visual_encoder.") for k in keys)


# ---------------------------------------------------------------------------------------- rule blocks


def vit_rules(dst: str, src: str, cfg: ViTConfig) -> list[km.Rule]:
    """Our VisionTransformer at `dst` <- HF BlipVisionModel at `src`."""
    rules = [
        km.rule(f"{dst}/cls_token", f"{src}.embeddings.class_embedding"),
        # The checkpoint's grid may differ from ours (224 px pre-training -> 384 px fine-tuning).
        km.rule(f"{dst}/pos_embed", f"{src}.embeddings.position_embedding", km.resize_pos(num_prefix=1)),
        km.rule(f"{dst}/patch_embed/kernel", f"{src}.embeddings.patch_embedding.weight", km.conv()),
        *km.norm_rules(f"{dst}/final_norm", f"{src}.post_layernorm"),
    ]
    if cfg.patch_bias:
        rules.append(km.rule(f"{dst}/patch_embed/bias", f"{src}.embeddings.patch_embedding.bias"))
    for i in range(cfg.num_layers):
        d, s = f"{dst}/layer_{i}", f"{src}.encoder.layers.{i}"
        rules += [
            *km.norm_rules(f"{d}/norm1", f"{s}.layer_norm1"),
            *km.linear_rules(f"{d}/attn/qkv", f"{s}.self_attn.qkv"),
            *km.linear_rules(f"{d}/attn/proj", f"{s}.self_attn.projection"),
            *km.norm_rules(f"{d}/norm2", f"{s}.layer_norm2"),
            *km.linear_rules(f"{d}/mlp/fc1", f"{s}.mlp.fc1"),
            *km.linear_rules(f"{d}/mlp/fc2", f"{s}.mlp.fc2"),
        ]
    return rules


def bert_rules(dst: str, src: str, cfg: BertConfig, cross_attention: bool) -> list[km.Rule]:
    """Our BertMED at `dst` <- HF BlipTextModel (BERT layout) at `src`."""
    e = f"{src}.embeddings"
    rules = [
        km.rule(f"{dst}/embeddings/word_embeddings/embedding", f"{e}.word_embeddings.weight"),
        km.rule(f"{dst}/embeddings/position_embeddings/embedding", f"{e}.position_embeddings.weight"),
        *km.norm_rules(f"{dst}/embeddings/norm", f"{e}.LayerNorm"),
    ]
    blocks = [("self_attn", "attention")] + ([("cross_attn", "crossattention")] if cross_attention else [])
    for i in range(cfg.num_layers):
        d, s = f"{dst}/layer_{i}", f"{src}.encoder.layer.{i}"
        for ours, theirs in blocks:
            rules += [
                *km.linear_rules(f"{d}/{ours}/query", f"{s}.{theirs}.self.query"),
                *km.linear_rules(f"{d}/{ours}/key", f"{s}.{theirs}.self.key"),
                *km.linear_rules(f"{d}/{ours}/value", f"{s}.{theirs}.self.value"),
                *km.linear_rules(f"{d}/{ours}/out", f"{s}.{theirs}.output.dense"),
                *km.norm_rules(f"{d}/{ours}/out_norm", f"{s}.{theirs}.output.LayerNorm"),
            ]
        rules += [
            *km.linear_rules(f"{d}/ffn/intermediate", f"{s}.intermediate.dense"),
            *km.linear_rules(f"{d}/ffn/output", f"{s}.output.dense"),
            *km.norm_rules(f"{d}/ffn/norm", f"{s}.output.LayerNorm"),
        ]
    return rules


def lm_head_rules(dst: str, src: str, word_embeddings: str) -> list[km.Rule]:
    """Our BertLMHead <- HF `cls.predictions`; the decoder weight falls back to the tied word embeddings."""
    p = f"{src}.predictions"
    return [
        *km.linear_rules(f"{dst}/transform", f"{p}.transform.dense"),
        *km.norm_rules(f"{dst}/transform_norm", f"{p}.transform.LayerNorm"),
        # HF ties decoder.weight to the word embeddings and leaves it out of saved files.
        km.rule(f"{dst}/decoder/kernel", f"{p}.decoder.weight", km.linear())
        .or_else(word_embeddings, km.linear()),
        # decoder.bias is a tied alias of predictions.bias (ignored below).
        km.rule(f"{dst}/decoder/bias", f"{p}.bias"),
    ]


COMMON_IGNORES = (
    km.ignore(r".*embeddings\.position_ids", "buffer: arange of positions, rebuilt by the model"),
    km.ignore(r".*cls\.predictions\.decoder\.bias", "tied alias of cls.predictions.bias"),
)


def _task_parts(cfg: BlipConfig, dst: str = "", src: str = "") -> list[km.Rule]:
    rules = vit_rules(f"{dst}visual_encoder", f"{src}vision_model", cfg.vision)
    if cfg.task in ("retrieval", "vqa"):
        rules += bert_rules(f"{dst}text_encoder", f"{src}text_encoder", cfg.text, cfg.text.cross_attention)
    return rules


def blip_keymap(cfg: BlipConfig) -> km.KeyMap:
    """The key map of a BLIP task model against HF transformers' names."""
    rules = _task_parts(cfg)
    if cfg.task == "retrieval":
        rules += km.linear_rules("vision_proj", "vision_proj") + km.linear_rules("text_proj", "text_proj")
        rules += km.linear_rules("itm_head", "itm_head")
        rules.append(km.rule("temp", "temp").or_constant(cfg.temp, BLIP_TEMP_REASON).no_export())
    if cfg.task in ("vqa", "caption"):
        rules += bert_rules("text_decoder/bert", "text_decoder.bert", cfg.text, cross_attention=True)
        rules += lm_head_rules("text_decoder/lm_head", "text_decoder.cls",
                               "text_decoder.bert.embeddings.word_embeddings.weight")
    return km.KeyMap(tuple(rules), COMMON_IGNORES)


def momentum_keymap(cfg: BlipConfig) -> km.KeyMap:
    """Momentum copies (renamed `momentum.*` keys) -> a `momentum/` tree shaped like the model's parts."""
    rules = vit_rules("momentum/visual_encoder", "momentum.vision_model", cfg.vision)
    rules += bert_rules("momentum/text_encoder", "momentum.text_encoder", cfg.text, cfg.text.cross_attention)
    rules += km.linear_rules("momentum/vision_proj", "momentum.vision_proj")
    rules += km.linear_rules("momentum/text_proj", "momentum.text_proj")
    return km.KeyMap(tuple(rules))


def _other_task_ignores(task: str) -> tuple[km.Ignore, ...]:
    """Salesforce pre-training checkpoints hold every head; the ones a task does not use are dropped."""
    unused = {
        "retrieval": [r"text_decoder\..*"],
        "vqa": [r"(vision_proj|text_proj|itm_head)\..*", r"temp"],
        "caption": [r"text_encoder\..*", r"(vision_proj|text_proj|itm_head)\..*", r"temp"],
    }[task]
    return tuple(km.ignore(p, f"not part of the BLIP {task} model") for p in unused)


# ------------------------------------------------------------------------------------------- configs


_HF_ACTS = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
    "relu": "relu", "silu": "silu",
}


def _act(name: str) -> str:
    if name not in _HF_ACTS:
        raise ValueError(f"unsupported activation {name!r} in the HF config; known: {sorted(_HF_ACTS)}")
    return _HF_ACTS[name]


def config_from_hf(hf: Mapping[str, Any], task: str, image_size: int | None = None) -> BlipConfig:
    """Our BlipConfig from an HF BLIP `config.json` dict (image_size overrides the vision config's)."""
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    vision = ViTConfig(
        image_size=image_size or v.get("image_size", 384),
        patch_size=v.get("patch_size", 16),
        hidden_size=v.get("hidden_size", 768),
        num_layers=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 12),
        mlp_dim=v.get("intermediate_size", 3072),
        eps=v.get("layer_norm_eps", 1e-5),
        act=_act(v.get("hidden_act", "gelu")),
    )
    bos = t.get("bos_token_id", 30522)
    text = BertConfig(
        vocab_size=t.get("vocab_size", 30524),
        hidden_size=t.get("hidden_size", 768),
        num_layers=t.get("num_hidden_layers", 12),
        num_heads=t.get("num_attention_heads", 8),
        intermediate_size=t.get("intermediate_size", 3072),
        max_position_embeddings=t.get("max_position_embeddings", 512),
        eps=t.get("layer_norm_eps", 1e-12),
        encoder_width=t.get("encoder_hidden_size", vision.hidden_size),
        act=_act(t.get("hidden_act", "gelu")),
        dropout=t.get("hidden_dropout_prob", 0.0),
        pad_token_id=t.get("pad_token_id", 0),
    )
    return BlipConfig(
        vision=vision, text=text, task=task, embed_dim=hf.get("image_text_hidden_size", 256),
        bos_token_id=bos, enc_token_id=bos + ENC_AFTER_BOS, sep_token_id=t.get("sep_token_id", 102),
        pad_token_id=t.get("pad_token_id", 0),
    )


def config_to_hf(cfg: BlipConfig) -> dict[str, Any]:
    """An HF BLIP `config.json` dict for our config (inverse of config_from_hf)."""
    acts = {ours: theirs for theirs, ours in reversed(list(_HF_ACTS.items()))}
    v, t = cfg.vision, cfg.text
    return {
        "model_type": "blip",
        "architectures": [HF_ARCHITECTURES[cfg.task]],
        "image_text_hidden_size": cfg.embed_dim,
        "vision_config": {
            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "intermediate_size": v.mlp_dim, "layer_norm_eps": v.eps, "hidden_act": acts[v.act],
        },
        "text_config": {
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings, "layer_norm_eps": t.eps,
            "encoder_hidden_size": t.encoder_width, "hidden_act": acts[t.act],
            "hidden_dropout_prob": t.dropout, "bos_token_id": cfg.bos_token_id,
            "sep_token_id": cfg.sep_token_id, "pad_token_id": cfg.pad_token_id,
        },
    }


def _count(keys: Sequence[str], pattern: str) -> int:
    found = {m.group(1) for k in keys if (m := re.match(pattern, k))}
    return len(found)


def config_from_salesforce(
    source: TensorSource, task: str, image_size: int | None = None, vision_heads: int | None = None,
    text_heads: int | None = None,
) -> BlipConfig:
    """Our BlipConfig read off a (renamed) Salesforce checkpoint's shapes.

    Head counts are not in the shapes: BLIP's ViT-B/L and BERT-base all use 64-wide heads.
    `image_size` defaults to the checkpoint's own grid (no position-table resize).
    """
    keys = source.keys()
    d_v = source.shape("vision_model.embeddings.class_embedding")[-1]
    patch = source.shape("vision_model.embeddings.patch_embedding.weight")[-1]
    grid = int(np.sqrt(source.shape("vision_model.embeddings.position_embedding")[1] - 1))
    vision = ViTConfig(
        image_size=image_size or grid * patch, patch_size=patch, hidden_size=d_v,
        num_layers=_count(keys, r"vision_model\.encoder\.layers\.(\d+)\."),
        num_heads=vision_heads or max(1, d_v // 64),
        mlp_dim=source.shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0], eps=1e-6,
    )
    text_root = "text_encoder" if task != "caption" else "text_decoder.bert"
    vocab, d_t = source.shape(f"{text_root}.embeddings.word_embeddings.weight")
    text = BertConfig(
        vocab_size=vocab, hidden_size=d_t,
        num_layers=_count(keys, re.escape(text_root) + r"\.encoder\.layer\.(\d+)\."),
        num_heads=text_heads or max(1, d_t // 64),
        intermediate_size=source.shape(f"{text_root}.encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=source.shape(f"{text_root}.embeddings.position_embeddings.weight")[0],
        encoder_width=d_v,
    )
    embed_dim = source.shape("vision_proj.weight")[0] if "vision_proj.weight" in keys else 256
    return BlipConfig(vision=vision, text=text, task=task, embed_dim=embed_dim)


def infer_task(keys: Sequence[str], hf_config: Mapping[str, Any] | None = None) -> str:
    """retrieval / vqa / caption from HF `architectures`, else from which heads the checkpoint has."""
    arch = (hf_config or {}).get("architectures") or []
    for task, name in HF_ARCHITECTURES.items():
        if name in arch:
            return task
    keys = set(keys)
    if "itm_head.weight" in keys:
        return "retrieval"  # also Salesforce pre-training checkpoints (model_base.pth)
    has_decoder = any(k.startswith("text_decoder.") for k in keys)
    if has_decoder and any(k.startswith("text_encoder.") for k in keys):
        return "vqa"
    if has_decoder:
        return "caption"
    raise ValueError(f"cannot tell the BLIP task from the checkpoint; pass task= (one of {TASKS})")


# --------------------------------------------------------------------------------------------- loading


@dataclasses.dataclass
class BlipConversion:
    config: BlipConfig
    params: dict
    extras: dict | None  # {'momentum': {...}, 'queues': {...}} when asked for
    source_format: str  # 'hf' or 'salesforce'
    ignored: dict[str, str]  # source key -> reason


def _hf_config_of(src: Path) -> dict | None:
    folder = src if src.is_dir() else src.parent
    path = folder / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        if cfg.get("model_type") == "blip" or "vision_config" in cfg:
            return cfg
    return None


def _queue_target(source: TensorSource) -> dict:
    return {k: jax.ShapeDtypeStruct(source.shape(k), km.np_dtype(source.dtype(k)))
            for k in QUEUE_KEYS if k in source.keys()}


def convert_blip(
    src: str | os.PathLike | TensorSource,
    *,
    task: str | None = None,
    image_size: int | None = None,
    dtype: str | None = None,
    config: BlipConfig | None = None,
    momentum: bool = False,
    progress: bool = False,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> BlipConversion:
    """Convert an HF BLIP folder/file or a Salesforce BLIP `.pth` to our params (and extras).

    `config` overrides everything derived from the checkpoint; `image_size` resizes the position
    table; `momentum=True` also returns the Salesforce `*_m` copies and queues as extras.
    `vision_heads` / `text_heads` matter only for `.pth` files, whose shapes do not tell the head
    count (default: 64-wide heads, as in every released BLIP).
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    opts = dict(task=task, image_size=image_size, dtype=dtype, config=config, momentum=momentum,
                progress=progress, vision_heads=vision_heads, text_heads=text_heads)
    if isinstance(src, TensorSource):
        return _convert(src, None, **opts)
    with open_checkpoint(src) as source:  # params are copies: the files can be closed afterwards
        return _convert(source, Path(src), **opts)


@dataclasses.dataclass
class BlipPlan:
    """A checked conversion, nothing read yet: run it with `keymap.apply` or `keymap.streamed`."""

    config: BlipConfig
    keymap: km.KeyMap
    plan: km.Plan
    source: TensorSource  # renamed into HF's names for Salesforce checkpoints
    source_format: str  # 'hf' or 'salesforce'


EXTRA_PARTS = ("momentum/", "queues/")


def is_extra(path: str) -> bool:
    """Momentum copies and queues: written to extras/, apart from the model's params."""
    return path.startswith(EXTRA_PARTS)


def _convert(source: TensorSource, src_path: Path | None, *, task, image_size, dtype, config, momentum,
             progress, vision_heads, text_heads) -> BlipConversion:
    bp = plan_blip(source, src_path, task=task, image_size=image_size, config=config, momentum=momentum,
                   vision_heads=vision_heads, text_heads=text_heads)
    params = bp.keymap.apply(bp.plan, bp.source, dtype=dtype, progress="BLIP tensors" if progress else False)
    extras = None
    if momentum:
        extras = {"momentum": params.pop("momentum", {}), "queues": params.pop("queues", {})}
    return BlipConversion(bp.config, params, extras, bp.source_format, bp.plan.ignored)


def plan_blip(source: TensorSource, src_path: Path | None, *, task=None, image_size=None, config=None,
              momentum=False, vision_heads=None, text_heads=None) -> BlipPlan:
    """Config, key map and checked plan of a BLIP checkpoint (arguments as `convert_blip`)."""
    salesforce = is_salesforce(source.keys())
    hf_config = None if (salesforce or src_path is None) else _hf_config_of(src_path)
    if salesforce:
        source = RenamedSource(source, salesforce_to_hf)
    task = task or (config.task if config is not None else infer_task(source.keys(), hf_config))
    if config is None:
        if hf_config is not None:
            config = config_from_hf(hf_config, task, image_size)
        elif salesforce:
            config = config_from_salesforce(source, task, image_size, vision_heads, text_heads)
        else:
            raise ValueError(f"{source.describe()}: HF weights without a config.json; pass config=")
    elif image_size is not None:
        config = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size))
    config = config.replace(task=task)
    if momentum and task != "retrieval":
        raise ValueError(f"momentum copies belong to the retrieval model, not to {task!r}")

    kmap = blip_keymap(config)
    target = dict(abstract_params(config))
    if salesforce:
        kmap = kmap.with_ignores(*_other_task_ignores(task))
    if momentum:
        kmap = kmap + momentum_keymap(config)
        target["momentum"] = {p: target[p] for p in MOMENTUM_PARTS if p in target}
        queues = _queue_target(source)
        target["queues"] = queues
        kmap = kmap + km.KeyMap(tuple(km.rule(f"queues/{k}", k) for k in queues))
    else:
        reason = "momentum copy / queue (pass momentum=True to keep them)"
        kmap = kmap.with_ignores(km.ignore(r"momentum\..*", reason),
                                 *(km.ignore(re.escape(k), reason) for k in QUEUE_KEYS))
    return BlipPlan(config, kmap, kmap.plan(source, target), source, "salesforce" if salesforce else "hf")


def load_blip(src: str | os.PathLike, **kwargs: Any):
    """(config, params), or (config, params, extras) with momentum=True; keywords as `convert_blip`."""
    c = convert_blip(src, **kwargs)
    return (c.config, c.params, c.extras) if kwargs.get("momentum") else (c.config, c.params)


# ---------------------------------------------------------------------------------------------- export


def export_blip_hf(config: BlipConfig, params: Mapping) -> dict[str, np.ndarray]:
    """Our params -> an HF transformers BLIP state dict (names and layouts of `HF_ARCHITECTURES[task]`)."""
    return blip_keymap(config).export(params)


def save_blip_hf(dst: str | os.PathLike, config: BlipConfig, params: Mapping) -> Path:
    """Write an HF folder (`config.json` + `model.safetensors`) loadable with `from_pretrained`."""
    from safetensors.numpy import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = export_blip_hf(config, params)
    # safetensors' numpy writer has no bfloat16; HF loads float32 into any dtype.
    state = {k: (v.astype(np.float32) if v.dtype.name == "bfloat16" else v) for k, v in state.items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    return dst


# ------------------------------------------------------------------------------------------------- CLI


def cli(argv: Sequence[str] | None = None) -> int:
    """python -m aurora_jax.convert blip --src PATH --dst DIR [--task ...] [--image-size N] [--dtype ...]"""
    p = base_parser("blip", "Convert an HF BLIP folder or a Salesforce BLIP .pth to aurora-jax params.")
    p.add_argument("--task", choices=TASKS, default=None, help="default: from the checkpoint")
    p.add_argument("--image-size", type=int, default=None, help="resize the position table to this size")
    p.add_argument("--momentum", action="store_true",
                   help="also keep Salesforce momentum copies and queues (written to extras/)")
    p.add_argument("--vision-heads", type=int, default=None, help=".pth only: ViT heads (default width / 64)")
    p.add_argument("--text-heads", type=int, default=None, help=".pth only: BERT heads (default width / 64)")
    args = p.parse_args(argv)
    with open_checkpoint(args.src) as source:
        bp = plan_blip(source, Path(args.src), task=args.task, image_size=args.image_size,
                       momentum=args.momentum, vision_heads=args.vision_heads, text_heads=args.text_heads)
        progress = "BLIP tensors" if args.progress else False

        def streamed(keep) -> km.StreamedTree:  # written tensor by tensor
            return bp.keymap.streamed(bp.plan.only(keep), bp.source, dtype=args.dtype, progress=progress)

        meta = {"source": str(Path(args.src).absolute()), "source_format": bp.source_format,
                "dtype": args.dtype, "model": "blip"}
        save_converted(args.dst, bp.config, streamed(lambda t: not is_extra(t)),
                       extras=streamed(is_extra) if args.momentum else None, meta=meta, tokenizer_from=args.src,
                       force=args.force, compress=args.compress)
    print(f"wrote {args.dst}: BLIP {bp.config.task}, image size {bp.config.vision.image_size}, {args.dtype}"
          f"{', with momentum extras' if args.momentum else ''}")
    return 0
