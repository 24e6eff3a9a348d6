"""Checkpoints of the Aurora release (WillDreamer/Aurora `train_retrieval.py`, `train_vqa.py`): import and export.

A release `.pth` is `{'model': state_dict, ...}`: the Salesforce BLIP keys (trained heads included, momentum
copies and queues for retrieval) plus the adapter under the release's module names:

    CP_U.weight (R, d), CP_V.weight (d, R)      torch Linear weights of our U (d, R) and V (R, d), transposed
    CP_C (R, R, R)                              the core, as ours
    visual_encoder.blocks.N.attn.CP_attention   (R, 4)  our factors/visual_encoder/layer_N/attn
    visual_encoder.blocks.N.mlp.mlp_CP          (R, 8)  our factors/visual_encoder/layer_N/mlp
    <bert>.encoder.layer.N.{attention,crossattention}.self.{q,k,v}_CP   (R, 1)
    <bert>.encoder.layer.N.CP_{scale,shift}{self,cross}                 (d,)  our gqt a_s, b_s, a_x, b_x
and the momentum encoders' own factors and GQT under `visual_encoder_m.` / `text_encoder_m.` (retrieval).
`<bert>` is `text_encoder` or `text_decoder.bert` (VQA). Names are derived from our adapter tree, so import and
export are one table read both ways.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from aurora_jax.convert.blip import BlipConversion, convert_blip
from aurora_jax.convert.readers import RenamedSource, TensorSource, open_checkpoint
from aurora_jax.models.blip import BlipConfig, abstract_params
from aurora_jax.peft import PeftConfig, init_adapter
from aurora_jax.peft.partition import base_trainable

Path_ = tuple[str, ...]
SHARED_NAMES = {"U": "CP_U.weight", "V": "CP_V.weight", "C": "CP_C"}
TRANSPOSED = ("U", "V")  # stored as torch Linear weights (out, in)
GQT_NAMES = {"a_s": "CP_scaleself", "b_s": "CP_shiftself", "a_x": "CP_scalecross", "b_x": "CP_shiftcross"}
VIT_FACTOR_NAMES = {"attn": "attn.CP_attention", "mlp": "mlp.mlp_CP"}
BERT_BLOCKS = {"self_attn": "attention", "cross_attn": "crossattention"}
BERT_FACTORS = {"query": "q_CP", "key": "k_CP", "value": "v_CP"}
MOMENTUM_PREFIX = {"visual_encoder": "visual_encoder_m", "text_encoder": "text_encoder_m"}
RELEASE_HEADS = ("vision_proj", "itm_head")  # top-level Linears: the same names in the release and here
_RELEASE_KEY = re.compile(r"(^|\.)(CP_\w+|\w+_CP)(\.weight)?$")


def is_release_adapter_key(key: str) -> bool:
    """A key of the release's adapter (shared, per-site or GQT), online or momentum copy."""
    return _RELEASE_KEY.search(key) is not None


def _layer(name: str) -> str:
    if not name.startswith("layer_"):
        raise ValueError(f"not a layer name: {name!r}")
    return name[len("layer_"):]


def _module(path: Path_) -> str:
    """Our encoder/decoder layer path -> the Salesforce module prefix of that layer."""
    if path[0] == "visual_encoder":
        return f"visual_encoder.blocks.{_layer(path[1])}"
    if path[0] == "text_encoder":
        return f"text_encoder.encoder.layer.{_layer(path[1])}"
    if path[:2] == ("text_decoder", "bert"):
        return f"text_decoder.bert.encoder.layer.{_layer(path[2])}"
    raise ValueError(f"no release name for an adapter under {'/'.join(path)}")


def release_key(path: Path_) -> str:
    """Our adapter leaf path ('shared' | 'factors' | 'gqt', ...) -> the release's state-dict key."""
    part, rest = path[0], path[1:]
    if part == "shared":
        if rest[0] not in SHARED_NAMES:
            raise ValueError(f"the release has no shared {rest[0]!r} (LLM-side Aurora is ours only)")
        return SHARED_NAMES[rest[0]]
    if part == "factors":
        if rest[0] == "visual_encoder":
            return f"{_module(rest[:2])}.{VIT_FACTOR_NAMES[rest[2]]}"
        layer = rest[:3] if rest[0] == "text_decoder" else rest[:2]
        block, dense = rest[len(layer)], rest[len(layer) + 1]
        return f"{_module(layer)}.{BERT_BLOCKS[block]}.self.{BERT_FACTORS[dense]}"
    if part == "gqt":
        return f"{_module(rest[:-1])}.{GQT_NAMES[rest[-1]]}"
    raise ValueError(f"no release name for adapter part {part!r}")


def momentum_key(path: Path_) -> str:
    """The release key of the momentum encoders' copy of a per-site factor or GQT vector."""
    key = release_key(path)
    top, _, rest = key.partition(".")
    if top not in MOMENTUM_PREFIX:
        raise ValueError(f"{key}: the release keeps no momentum copy of it")
    return f"{MOMENTUM_PREFIX[top]}.{rest}"


def _leaves(tree: Mapping) -> dict[Path_, Any]:
    return traverse_util.flatten_dict(dict(tree))


def release_peft_config(config: BlipConfig, rank: int, *, gqt: bool) -> PeftConfig:
    """The PeftConfig of a release run: dense core, every release site, ICE and the heads it trains for retrieval
    (train_retrieval.py: CP*, vision_proj, itm_head; train_vqa.py: CP* alone)."""
    retrieval = config.task == "retrieval"
    return PeftConfig(method="aurora", rank=rank, core="dense", gqt=gqt, ice=retrieval,
                      train_heads=RELEASE_HEADS if retrieval else ())


def check_release_compatible(peft_cfg: PeftConfig) -> None:
    """The release layout holds the dense-core mode approximation on BLIP, with or without GQT."""
    if peft_cfg.method != "aurora" or peft_cfg.core != "dense":
        raise ValueError(f"the Aurora release holds dense-core mode-approximation adapters; this one is "
                         f"method={peft_cfg.method!r}, core={peft_cfg.core!r}")


# --------------------------------------------------------------------------------------------- import


@dataclasses.dataclass
class ReleaseConversion:
    blip: BlipConversion  # base params (trained heads included) and, with momentum=True, extras
    adapter: dict
    peft_cfg: PeftConfig
    momentum_adapter: dict | None  # the momentum encoders' factors and GQT (momentum=True, retrieval)


def _read_adapter(source: TensorSource, want: Mapping[Path_, Any], name_of) -> tuple[dict, list[str]]:
    """Read every leaf of `want` from its release key; problems (missing keys, shapes) are listed, not raised."""
    out, problems = {}, []
    for path, like in want.items():
        key = name_of(path)
        if key not in source:
            problems.append(f"missing {key}")
            continue
        shape = tuple(source.shape(key))
        expect = tuple(reversed(like.shape)) if path[-1] in TRANSPOSED and path[0] == "shared" else tuple(like.shape)
        if shape != expect:
            problems.append(f"{key}: shape {list(shape)}, the model needs {list(expect)}")
            continue
        value = np.asarray(source.read(key))
        if not np.issubdtype(value.dtype, np.floating):
            problems.append(f"{key}: dtype {value.dtype}, a floating-point tensor is needed")
            continue
        if not np.isfinite(value).all():
            problems.append(f"{key}: {int((~np.isfinite(value)).sum())} non-finite values")
            continue
        out[path] = np.ascontiguousarray(value.T if expect != tuple(like.shape) else value, np.float32)
    return traverse_util.unflatten_dict(out), problems


def convert_release(src: str | os.PathLike, *, task: str | None = None, image_size: int | None = None,
                    dtype: str | None = None, momentum: bool = False, **blip_kwargs: Any) -> ReleaseConversion:
    """A release `.pth` -> BLIP base params + our adapter (+ the momentum copies), every adapter key checked.

    Missing, extra, mis-shaped, non-float or non-finite adapter tensors are refused with their names.
    """
    with open_checkpoint(src) as source:
        adapter_keys = [k for k in source.keys() if is_release_adapter_key(k)]
        if "CP_C" not in source:
            raise ValueError(f"{source.describe()} holds no CP_C: not an Aurora release checkpoint"
                             + (f" (adapter-like keys: {adapter_keys[:5]})" if adapter_keys else ""))
        rank = int(source.shape("CP_C")[0])
        blip_source = RenamedSource(source, lambda k: None if is_release_adapter_key(k) else k)
        blip = convert_blip(blip_source, task=task, image_size=image_size, dtype=dtype, momentum=momentum,
                            **blip_kwargs)
        gqt = any(k.endswith(GQT_NAMES["a_s"]) for k in adapter_keys)
        peft_cfg = release_peft_config(blip.config, rank, gqt=gqt)
        want = _leaves(jax.eval_shape(lambda k: init_adapter(abstract_params(blip.config), peft_cfg, k),
                                      jax.random.key(0)))
        adapter, problems = _read_adapter(source, want, release_key)
        expected = {release_key(p) for p in want}
        momentum_want = {p: v for p, v in want.items() if p[0] != "shared" and p[1] in MOMENTUM_PREFIX}
        momentum_names = {momentum_key(p) for p in momentum_want}
        momentum_adapter = None
        if momentum:
            momentum_adapter, m_problems = _read_adapter(source, momentum_want, momentum_key)
            problems += m_problems
        extra = sorted(set(adapter_keys) - expected - momentum_names)
        problems += [f"unexpected {k} (no site of the {blip.config.task} model)" for k in extra]
        if problems:
            raise ValueError(f"{source.describe()}: the release adapter does not fit the converted "
                             f"{blip.config.task} model (R={rank}):\n  " + "\n  ".join(problems))
    return ReleaseConversion(blip, adapter, peft_cfg, momentum_adapter)


# --------------------------------------------------------------------------------------------- export


def export_release(config: BlipConfig, adapter: Mapping, peft_cfg: PeftConfig, base: Mapping | None = None,
                   momentum_adapter: Mapping | None = None) -> dict[str, np.ndarray]:
    """Our adapter (+ the base leaves it trained, + momentum copies) -> release state-dict entries.

    A PyTorch user loads them into the release model with `load_state_dict(sd, strict=False)`.
    """
    check_release_compatible(peft_cfg)
    out = {}
    for path, value in _leaves(adapter).items():
        value = np.asarray(value, np.float32)
        out[release_key(path)] = np.ascontiguousarray(value.T if path[0] == "shared" and path[-1] in TRANSPOSED
                                                      else value)
    for path, value in _leaves(momentum_adapter or {}).items():
        out[momentum_key(path)] = np.asarray(value, np.float32)
    if base is not None:
        out.update(head_entries({k: v for k, v in _leaves(base).items() if base_trainable(k, peft_cfg)}))
    return out


def head_entries(leaves: Mapping[Path_, Any]) -> dict[str, np.ndarray]:
    """Trained top-level heads (Linears, the temperature) under their Salesforce names; anything deeper is refused."""
    out = {}
    for path, value in leaves.items():
        value = np.asarray(value, np.float32)
        if path == ("temp",):
            out["temp"] = value
        elif len(path) == 2 and path[1] in ("kernel", "bias"):
            out[f"{path[0]}.{'weight' if path[1] == 'kernel' else 'bias'}"] = np.ascontiguousarray(
                value.T if path[1] == "kernel" else value)
        else:
            raise ValueError(f"trained base leaf {'/'.join(path)} has no place in the release layout (heads only)")
    return out


def save_release(dst: str | os.PathLike, config: BlipConfig, adapter: Mapping, peft_cfg: PeftConfig,
                 base: Mapping | None = None) -> Path:
    """Write `{'model': export_release(...)}` as a torch `.pth` file (a folder gets `aurora_release.pth`)."""
    import torch

    dst = Path(dst)
    if dst.suffix != ".pth":
        dst.mkdir(parents=True, exist_ok=True)
        dst = dst / "aurora_release.pth"
    state = {k: torch.from_numpy(np.array(v)) for k, v in export_release(config, adapter, peft_cfg, base).items()}
    torch.save({"model": state}, dst)
    return dst


# ------------------------------------------------------------------------------------------------- CLI


ADAPTER_DIR = "adapter"  # the adapter folder inside a converted release checkpoint


def cli(argv: list[str] | None = None) -> int:
    """python -m aurora_jax.convert aurora-release --src checkpoint_best.pth --dst DIR [--momentum] [...]

    Writes DIR (the BLIP base, as `convert blip`) and DIR/adapter (the adapter + the heads it trained), which a run
    continues with `--config.model.init=DIR --config.adapter_init=DIR/adapter` (add `--momentum` for retrieval
    with the momentum model: its copies, its own factors and GQT, and the queues go to DIR's extras).
    """
    from aurora_jax.convert.cli import base_parser
    from aurora_jax.convert.store import save_converted
    from aurora_jax.models.blip import TASKS
    from aurora_jax.peft.store import save_adapter, trained_base_leaves

    p = base_parser("aurora-release", "Convert an Aurora release checkpoint (.pth) to a BLIP base + an adapter.")
    p.add_argument("--task", choices=TASKS[:2], default=None, help="default: from the checkpoint")
    p.add_argument("--image-size", type=int, default=None, help="resize the position table to this size")
    p.add_argument("--momentum", action="store_true", help="also keep the momentum model and queues (retrieval)")
    p.add_argument("--vision-heads", type=int, default=None, help="ViT heads (default width / 64)")
    p.add_argument("--text-heads", type=int, default=None, help="BERT heads (default width / 64)")
    args = p.parse_args(argv)
    conv = convert_release(args.src, task=args.task, image_size=args.image_size, dtype=args.dtype,
                           momentum=args.momentum, vision_heads=args.vision_heads, text_heads=args.text_heads)
    cfg, params, extras = conv.blip.config, conv.blip.params, conv.blip.extras
    if extras is not None and conv.momentum_adapter is not None:
        extras = dict(extras, momentum=dict(extras["momentum"], adapter=conv.momentum_adapter))
    meta = {"source": str(Path(args.src).absolute()), "source_format": "aurora-release", "dtype": args.dtype,
            "model": "blip"}
    save_converted(args.dst, cfg, params, extras=extras, meta=meta, tokenizer_from=args.src, force=args.force,
                   compress=args.compress)
    save_adapter(Path(args.dst) / ADAPTER_DIR, conv.adapter, conv.peft_cfg,
                 base_leaves=trained_base_leaves(params, conv.peft_cfg), model_config=cfg, meta=meta)
    print(f"wrote {args.dst}: BLIP {cfg.task} + Aurora adapter R={conv.peft_cfg.rank} in {args.dst}/{ADAPTER_DIR}"
          f"{', with momentum extras' if args.momentum else ''}")
    return 0
