"""Our LLaMA / mPLUG-Owl params -> HF folders (config.json + safetensors) that PyTorch code loads.

- `save_llama_hf`: a transformers `LlamaForCausalLM` folder (`from_pretrained` loads it).
- `save_owl_hf`: the release's layout (X-PLUG/mPLUG-Owl: v1 `MplugOwlForConditionalGeneration`, v2
  `MPLUGOwl2LlamaForCausalLM`), which our own converter (`convert.owl.convert_owl`) reads back exactly.

Tensors are named by the converters' key maps run backwards (`KeyMap.export`), so import and export cannot
disagree. Shards are written one at a time (at most `max_shard_bytes` of transposed copies in memory), with
`model.safetensors.index.json` when there is more than one. A config the target layout cannot hold is
refused with the fields that would be lost (`release_problems`, `llama_hf_problems`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from aurora_jax.config_base import config_to_dict
from aurora_jax.convert import keymap as km
from aurora_jax.convert.llama import llama_keymap
from aurora_jax.convert.owl import owl_config_from_source, owl_keymap
from aurora_jax.convert.readers import DictSource
from aurora_jax.models.llama import LlamaConfig
from aurora_jax.models.owl import OwlConfig, with_compute

SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
INDEX_FILE = "model.safetensors.index.json"
# Release code pins: mPLUG-Owl v1 runs on transformers==4.28.1 (mPLUG-Owl/requirements.txt), whose LLaMA has
# neither grouped-query attention nor a configurable RoPE base.
V1_ROPE_THETA = 10000.0


# ------------------------------------------------------------------------------------------- writing


def _rule_bytes(rule: km.Rule, flat: Mapping[str, Any]) -> int:
    return sum(int(flat[t].nbytes) for t in rule.targets if t in flat)


def shard_rules(keymap: km.KeyMap, params: Mapping, max_shard_bytes: int) -> list[list[km.Rule]]:
    """The key map's exported rules in groups of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    groups: list[list[km.Rule]] = [[]]
    size = 0
    for r in keymap.rules:
        if not r.export or not r.alternatives[0].sources:
            continue
        n = _rule_bytes(r, flat)
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(r)
        size += n
    return [g for g in groups if g]


def write_safetensors(dst: str | os.PathLike, keymap: km.KeyMap, params: Mapping, *,
                      max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    """`params` through `keymap.export` as model.safetensors, or shards + index; returns the file names."""
    from safetensors.numpy import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    # An earlier export's shards or index next to the new files would be read instead of (or with) them.
    for stale in [*dst.glob("model-*-of-*.safetensors"), dst / "model.safetensors", dst / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    groups = shard_rules(keymap, params, max_shard_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map: dict[str, str] = {}
    total = 0
    for name, group in zip(names, groups, strict=True):
        state = km.KeyMap(group).export(params)  # one shard of transposed copies at a time
        save_file(state, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        total += sum(v.nbytes for v in state.values())
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def params_dtype(params: Mapping) -> str:
    """The floating dtype most of the params' bytes have ('float32', 'bfloat16', ...), for config.json."""
    sizes: dict[str, int] = {}
    for x in traverse_util.flatten_dict(params).values():
        name = np.dtype(x.dtype).name
        if name in ("float32", "bfloat16", "float16", "float64"):
            sizes[name] = sizes.get(name, 0) + int(x.nbytes)
    return max(sizes, key=sizes.get) if sizes else "float32"


def _write_config(dst: Path, config: Mapping[str, Any]) -> None:
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _config_diff(want: Any, got: Any) -> list[str]:
    """'field=ours (the folder would give back ...)' for every nested field that differs."""
    a = traverse_util.flatten_dict(config_to_dict(want), sep=".")
    b = traverse_util.flatten_dict(config_to_dict(got), sep=".")
    return [f"{k}={a[k]!r} (the folder would give back {b.get(k)!r})" for k in sorted(a) if a[k] != b.get(k)]


def _refuse(what: str, problems: Sequence[str]) -> None:
    if problems:
        raise ValueError(f"{what} cannot hold this model; it would lose:\n  " + "\n  ".join(problems)
                         + "\n(our converted format, --format converted, keeps everything)")


# --------------------------------------------------------------------------------------------- LLaMA


def llama_hf_config(cfg: LlamaConfig, dtype: str = "float32") -> dict[str, Any]:
    """transformers' LlamaConfig dict (the inverse of `LlamaConfig.from_hf`)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_eps,
        # rope_theta for transformers 4.x, rope_parameters for 5.x
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _rope_parameters(cfg),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


def _rope_parameters(cfg: LlamaConfig) -> dict[str, Any]:
    """transformers 5.x rope_parameters (the 4.x rope_scaling keys `type` / `factor` read the same)."""
    out = {"rope_type": cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "default":
        out.update(type=cfg.rope_scaling, factor=cfg.rope_scaling_factor)
    return out


def _llm_compute_free(cfg: LlamaConfig) -> LlamaConfig:
    return dataclasses.replace(cfg, dtype="float32", remat=False, attention_impl=None)


def llama_hf_problems(cfg: LlamaConfig) -> list[str]:
    """What a transformers LlamaForCausalLM folder cannot hold of `cfg`."""
    if cfg.modality_adaptive:
        return ["modality_adaptive=True: mPLUG-Owl2's image copies of k_proj, v_proj and both norms "
                "(LlamaForCausalLM has one of each; export the Owl2 model with save_owl_hf)"]
    back = LlamaConfig.from_hf(llama_hf_config(cfg))
    return _config_diff(_llm_compute_free(cfg), _llm_compute_free(back))


def save_llama_hf(dst: str | os.PathLike, cfg: LlamaConfig, params: Mapping, *,
                  max_shard_bytes: int = SHARD_BYTES) -> Path:
    """An HF LlamaForCausalLM folder: config.json + model.safetensors (or shards + index)."""
    _refuse("a transformers LlamaForCausalLM folder", llama_hf_problems(cfg))
    dst = Path(dst)
    write_safetensors(dst, llama_keymap(cfg), params, max_shard_bytes=max_shard_bytes)
    _write_config(dst, llama_hf_config(cfg, params_dtype(params)))
    return dst


# ----------------------------------------------------------------------------------------------- Owl


def _vision_config(cfg: OwlConfig) -> dict[str, Any]:
    v = cfg.vision
    return {"model_type": "mplug_owl_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": _HF_ACT[v.act], "layer_norm_eps": v.eps}


# `models.layers` activation names -> transformers' ACT2FN names (the inverse of convert.owl.HF_ACTIVATIONS).
_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu",
           "relu": "relu"}


def _abstractor_config(cfg: OwlConfig) -> dict[str, Any]:
    a = cfg.abstractor
    # The release reads layer_norm_eps only for the SwiGLU's ffn_ln (its other norms use torch's 1e-5).
    out = {"model_type": "mplug_owl_visual_abstract", "hidden_size": a.hidden_size,
           "num_hidden_layers": a.num_layers, "num_attention_heads": a.num_heads,
           "intermediate_size": a.intermediate_size, "layer_norm_eps": a.ffn_eps,
           "attention_probs_dropout_prob": a.attention_dropout, "encoder_hidden_size": cfg.vision.hidden_size}
    if cfg.version == 2:
        out.update(num_learnable_queries=a.num_queries, grid_size=a.grid_size)
    return out


def owl_hf_config(cfg: OwlConfig, dtype: str = "float32") -> dict[str, Any]:
    """The release's config.json: v1 nests the LLM under text_config, v2 is a LLaMA config + visual_config."""
    text = llama_hf_config(cfg.llm, dtype)
    if cfg.version == 1:
        text.pop("architectures")
        return {"architectures": ["MplugOwlForConditionalGeneration"], "model_type": "mplug-owl",
                "vision_config": _vision_config(cfg), "visual_abstractor_config": _abstractor_config(cfg),
                "text_config": text, "num_query_tokens": cfg.abstractor.num_queries, "torch_dtype": dtype}
    return {**text, "architectures": ["MPLUGOwl2LlamaForCausalLM"], "model_type": "mplug_owl2",
            "visual_config": {"visual_model": _vision_config(cfg), "visual_abstractor": _abstractor_config(cfg)}}


def release_problems(cfg: OwlConfig) -> list[str]:
    """What the release's code (as it pins its dependencies) cannot run of `cfg`."""
    llm, out = cfg.llm, []
    if llm.head_dim * llm.num_heads != llm.hidden_size:
        out.append(f"llm.head_dim={llm.head_dim}: the release's LLaMA derives head_dim = hidden_size / num_heads "
                   f"= {llm.hidden_size // llm.num_heads}")
    if cfg.version == 1:
        if llm.num_kv_heads != llm.num_heads:
            out.append(f"llm.num_kv_heads={llm.num_kv_heads} (grouped-query attention): mPLUG-Owl's LLaMA "
                       f"(transformers 4.28.1) has k/v projections for all {llm.num_heads} heads")
        if llm.rope_theta != V1_ROPE_THETA:
            out.append(f"llm.rope_theta={llm.rope_theta}: transformers 4.28.1's LLaMA fixes the RoPE base at "
                       f"{V1_ROPE_THETA:g}")
        if llm.rope_scaling != "default":
            out.append(f"llm.rope_scaling={llm.rope_scaling!r}: transformers 4.28.1's LLaMA has no RoPE scaling")
    return out


def owl_layout_problems(cfg: OwlConfig, state: Mapping[str, np.ndarray], hf: Mapping[str, Any]) -> list[str]:
    """Release limits, then every config field our converter would read back differently from the folder."""
    back = owl_config_from_source(DictSource(state), cfg.version, hf)
    return release_problems(cfg) + _config_diff(with_compute(cfg, "float32"), with_compute(back, "float32"))


def save_owl_hf(dst: str | os.PathLike, cfg: OwlConfig, params: Mapping, *,
                max_shard_bytes: int = SHARD_BYTES) -> Path:
    """The release's folder layout: config.json + model.safetensors (or shards), as `convert_owl` reads it."""
    name = "mPLUG-Owl" if cfg.version == 1 else "mPLUG-Owl2"
    keymap = owl_keymap(cfg)
    hf = owl_hf_config(cfg, params_dtype(params))
    # Shapes are all the check needs: zero-byte views stand in for the tensors.
    shapes = _shapes_only_export(keymap, params)
    _refuse(f"the {name} release layout", owl_layout_problems(cfg, shapes, hf))
    dst = Path(dst)
    write_safetensors(dst, keymap, params, max_shard_bytes=max_shard_bytes)
    _write_config(dst, hf)
    return dst


def _shapes_only_export(keymap: km.KeyMap, params: Mapping) -> dict[str, np.ndarray]:
    """What `keymap.export` would write, as zero-byte broadcast views with the right shapes."""
    flat = traverse_util.flatten_dict(params, sep="/")
    out = {}
    for r in keymap.rules:
        alt = r.alternatives[0]
        if not r.export or not alt.sources or any(t not in flat for t in r.targets):
            continue
        views = [np.broadcast_to(np.int8(0), np.shape(flat[t])) for t in r.targets]  # inverses only move axes
        out.update(zip(alt.sources, alt.transform.inverse(views), strict=True))
    return out
