"""HF `LlamaForCausalLM` checkpoints (safetensors or .bin, single or sharded) -> `models.llama` params.

Also the LLM part of mPLUG-Owl (under `language_model.`) and mPLUG-Owl2 (multiway k/v and norms,
`...multiway.{0,1}` = text, image), through `llama_rules(cfg, src=..., dst=...)`.

CLI: python -m aurora_jax.convert llama --src HF_FOLDER --dst DIR [--dtype bfloat16]
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aurora_jax.convert import keymap as km
from aurora_jax.convert.cli import base_parser
from aurora_jax.convert.readers import TensorSource, open_checkpoint
from aurora_jax.convert.store import save_converted
from aurora_jax.models.llama import LlamaConfig, abstract_params

ROTARY_IGNORE = km.ignore(
    r".*rotary_emb\.inv_freq", "RoPE frequencies are a buffer recomputed from rope_theta"
)


def llama_rules(cfg: LlamaConfig, *, src: str = "", dst: str = "") -> list[km.Rule]:
    """Rules for the LLaMA leaves under `dst` from keys under `src` ('model.layers.N...', 'lm_head...')."""
    linear = km.linear()

    def multiway(target: str, source: str, transform: km.Transform | None = None) -> list[km.Rule]:
        # Owl2 keeps two copies: multiway.0 (text) and multiway.1 (image).
        if not cfg.modality_adaptive:
            return [km.rule(f"{dst}{target}", f"{src}{source}.weight", transform)]
        return [
            km.rule(
                f"{dst}{target.replace('/#', f'/{way}')}", f"{src}{source}.multiway.{i}.weight", transform
            )
            for i, way in enumerate(("text", "image"))
        ]

    rules = [
        km.rule(f"{dst}embed_tokens/embedding", f"{src}model.embed_tokens.weight"),
        km.rule(f"{dst}final_norm/scale", f"{src}model.norm.weight"),
    ]
    if not cfg.tie_embeddings:
        rules.append(km.rule(f"{dst}lm_head/kernel", f"{src}lm_head.weight", linear))
    way = "/#" if cfg.modality_adaptive else ""
    for i in range(cfg.num_layers):
        s, t = f"model.layers.{i}.", f"layer_{i}/"
        for name in ("q_proj", "o_proj"):
            rules.append(km.rule(f"{dst}{t}attn/{name}/kernel", f"{src}{s}self_attn.{name}.weight", linear))
        for name in ("k_proj", "v_proj"):
            rules += multiway(f"{t}attn/{name}{way}/kernel", f"{s}self_attn.{name}", linear)
        for name in ("gate_proj", "up_proj", "down_proj"):
            rules.append(km.rule(f"{dst}{t}mlp/{name}/kernel", f"{src}{s}mlp.{name}.weight", linear))
        rules += multiway(f"{t}input_norm{way}/scale", f"{s}input_layernorm")
        rules += multiway(f"{t}post_attn_norm{way}/scale", f"{s}post_attention_layernorm")
    return rules


def llama_ignores(cfg: LlamaConfig, *, src: str = "") -> list[km.Ignore]:
    out = [ROTARY_IGNORE]
    if cfg.tie_embeddings:
        out.append(
            km.ignore(re.escape(f"{src}lm_head.weight"), "tied to embed_tokens (tie_word_embeddings=True)")
        )
    return out


def llama_keymap(cfg: LlamaConfig, *, src: str = "", dst: str = "") -> km.KeyMap:
    return km.KeyMap(llama_rules(cfg, src=src, dst=dst), llama_ignores(cfg, src=src))


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The folder holding a checkpoint (the path itself, or a file's parent)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_hf_config(path: str | os.PathLike) -> dict | None:
    """The HF config.json next to a checkpoint, or None."""
    f = checkpoint_folder(path) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def llama_config(path: str | os.PathLike, source: TensorSource | None = None, **overrides) -> LlamaConfig:
    """Our config from the checkpoint's config.json; `tie_embeddings` also follows the tensors present."""
    hf = read_hf_config(path)
    if hf is None:
        raise FileNotFoundError(
            f"no config.json next to {path}: LLaMA head counts and RoPE settings cannot be read from weights"
        )
    cfg = LlamaConfig.from_hf(hf, **overrides)
    if source is not None and "tie_embeddings" not in overrides:
        # Some exports drop lm_head.weight even with tie_word_embeddings unset.
        has_head = "lm_head.weight" in source.keys()
        cfg = cfg.replace(tie_embeddings=not has_head)
    return cfg


def convert_llama(
    path: str | os.PathLike, *, dtype: str | None = None, progress: bool = False, **overrides
) -> tuple[LlamaConfig, dict]:
    """(config, numpy params) from an HF LLaMA checkpoint, streamed tensor by tensor."""
    with open_checkpoint(path) as source:
        cfg = llama_config(path, source, **overrides)
        params = llama_keymap(cfg).convert(source, abstract_params(cfg), dtype=dtype, progress=progress)
    return cfg, params


def export_llama(cfg: LlamaConfig, params: dict) -> dict:
    """Our params -> an HF LlamaForCausalLM state dict of numpy arrays."""
    return llama_keymap(cfg).export(params)


def cli(argv: Sequence[str]) -> int:
    args = base_parser("llama", "HF LlamaForCausalLM (safetensors or .bin, sharded or not)").parse_args(argv)
    with open_checkpoint(args.src) as source:
        cfg = llama_config(args.src, source)
        dst = save_streamed(args, "llama", cfg, llama_keymap(cfg), source, abstract_params(cfg))
    print(f"wrote {dst}")
    return 0


def save_streamed(args: Any, name: str, cfg: Any, kmap: km.KeyMap, source: TensorSource, abstract: dict) -> Path:
    """The CLIs' conversion: plan (a bad checkpoint is refused before anything is written), then write tensor
    by tensor into `args.dst`."""
    plan = kmap.plan(source, abstract)
    return save_converted(
        args.dst,
        cfg,
        kmap.streamed(plan, source, dtype=args.dtype, progress=args.progress),
        meta={"source": name, "src": str(args.src), "dtype": args.dtype},
        tokenizer_from=checkpoint_folder(args.src),
        force=args.force,
        compress=args.compress,
    )
