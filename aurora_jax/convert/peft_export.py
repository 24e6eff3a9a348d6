"""LoRA adapters -> HF PEFT folders (adapter_config.json + adapter_model.safetensors) for the PyTorch models.

peft names a LoRA pair after the module it wraps, under the PeftModel's prefix:
`base_model.model.<module>.lora_A.weight` (r, in) and `....lora_B.weight` (out, r), the transposes of our
A (in, r) and B (r, out); its forward is ours, x + (alpha / r) B A drop(x). Module names come from the
converters' key maps (their Linear rules), so they are those of the model `PeftModel.from_pretrained` wraps:
  LLaMA and mPLUG-Owl v1: a transformers LlamaForCausalLM (for v1, the release's `language_model`);
  mPLUG-Owl2: the release's MPLUGOwl2LlamaForCausalLM, whose LLM sits at the top level; its per-modality k/v
  copies are `k_proj.multiway.{0,1}` (text, image). With no copy adapted that is a plain LlamaForCausalLM too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from aurora_jax.convert import keymap as km
from aurora_jax.convert.llama import llama_keymap, llama_rules
from aurora_jax.convert.owl import owl_keymap
from aurora_jax.models.llama import LlamaConfig
from aurora_jax.models.owl import OwlConfig
from aurora_jax.peft.config import PeftConfig

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LAYER_MODULE = re.compile(r"(?:.*\.)?layers\.\d+\.[^.]+\.(.+)")  # 'model.layers.3.self_attn.q_proj' -> 'q_proj'


def linear_modules(rules: Iterable[km.Rule]) -> dict[str, str]:
    """Our Dense path ('llm/layer_0/attn/q_proj') -> the torch Linear's name, from a key map's Linear rules."""
    linear = km.linear()
    out = {}
    for r in rules:
        alt = r.alternatives[0]
        if (len(r.targets) == 1 and r.targets[0].endswith("/kernel") and len(alt.sources) == 1
                and alt.sources[0].endswith(".weight") and alt.transform == linear):
            out[r.targets[0].removesuffix("/kernel")] = alt.sources[0].removesuffix(".weight")
    return out


def lora_pairs(adapter: Mapping) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """'/'-joined Dense path -> (A, B) of the adapter's LoRA tree."""
    flat = traverse_util.flatten_dict(dict(adapter.get("lora") or {}), sep="/")
    paths = sorted({k.rsplit("/", 1)[0] for k in flat})
    return {p: (np.asarray(flat[f"{p}/A"]), np.asarray(flat[f"{p}/B"])) for p in paths}


def adapter_problems(adapter: Mapping, peft_cfg: PeftConfig) -> list[str]:
    """Why `adapter` is not a LoRA adapter that a PEFT folder holds whole ([] when it is)."""
    if peft_cfg.method != "lora":
        what = {"aurora": "Aurora's mode-approximation factors (no HF PEFT method computes them; use --format "
                          "aurora for the adapter, or hf for merged weights)"}.get(
            peft_cfg.method, f"peft.method={peft_cfg.method!r} trains base weights, not an adapter (use --format hf)")
        return [what]
    other = sorted(k for k, v in adapter.items() if k != "lora" and v)
    return [f"adapter parts {other} besides LoRA"] if other else []


def peft_state(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], modules: Mapping[str, str]) -> dict:
    """peft's tensors: base_model.model.<module>.lora_A.weight = A.T (r, in), lora_B.weight = B.T (out, r)."""
    out = {}
    for path, (a, b) in pairs.items():
        name = PEFT_PREFIX + modules[path]
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return out


def target_modules(chosen: Iterable[str], every: Iterable[str]) -> list[str]:
    """peft's target_modules: short names ('q_proj', 'v_proj.multiway.0') when they select exactly `chosen`
    among `every` Linear (peft matches a name or a '.'-suffix), else the full module names."""
    chosen, every = set(chosen), set(every)
    short = {m.group(1) if (m := _LAYER_MODULE.fullmatch(c)) else c for c in chosen}
    selected = {e for e in every if any(e == t or e.endswith("." + t) for t in short)}
    return sorted(short if selected == chosen else chosen)


def peft_lora_config(peft_cfg: PeftConfig, targets: list[str], base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json of a LoRA as we train it (no bias, no rsLoRA / DoRA, scale alpha / r)."""
    alpha = peft_cfg.lora_alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": peft_cfg.lora_r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": peft_cfg.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft_lora(dst: str | os.PathLike, adapter: Mapping, peft_cfg: PeftConfig, modules: Mapping[str, str], *,
                   target: str, base_model: str | None = None) -> Path:
    """Write the LoRA of `adapter` for the model whose Linears `modules` names (`target` says which, in errors)."""
    from safetensors.numpy import save_file

    problems = adapter_problems(adapter, peft_cfg)
    pairs = lora_pairs(adapter)
    unmapped = [p for p in pairs if p not in modules]
    if unmapped:
        problems.append(f"LoRA on {', '.join(unmapped)}, which {target} does not have")
    if not pairs and not problems:
        problems.append("an empty LoRA adapter")
    if problems:
        raise ValueError(f"an HF PEFT folder for {target} cannot hold this adapter; it would lose:\n  "
                         + "\n  ".join(problems))
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(peft_state(pairs, modules), str(dst / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    targets = target_modules((modules[p] for p in pairs), modules.values())
    (dst / ADAPTER_CONFIG).write_text(json.dumps(peft_lora_config(peft_cfg, targets, base_model), indent=2) + "\n")
    return dst


def llama_peft_modules(cfg: LlamaConfig) -> dict[str, str]:
    return linear_modules(llama_keymap(cfg).rules)


def owl_peft_modules(cfg: OwlConfig) -> dict[str, str]:
    """The LLM's Linears: v1 relative to its LlamaForCausalLM, v2 to the whole release model (same names)."""
    if cfg.version == 1:
        return linear_modules(llama_rules(cfg.llm, src="", dst="llm/"))
    return {k: v for k, v in linear_modules(owl_keymap(cfg).rules).items() if k.startswith("llm/")}


def save_llama_peft(dst: str | os.PathLike, cfg: LlamaConfig, adapter: Mapping, peft_cfg: PeftConfig, *,
                    base_model: str | None = None) -> Path:
    """A LoRA adapter on our `models.llama` params as a PEFT folder for transformers' LlamaForCausalLM."""
    return save_peft_lora(dst, adapter, peft_cfg, llama_peft_modules(cfg), target="LlamaForCausalLM",
                          base_model=base_model)


def save_owl_peft(dst: str | os.PathLike, cfg: OwlConfig, adapter: Mapping, peft_cfg: PeftConfig, *,
                  base_model: str | None = None) -> Path:
    """The LLM's LoRA of an Owl adapter as a PEFT folder (see the module docstring for the base model)."""
    target = ("mPLUG-Owl's language model (a LlamaForCausalLM)" if cfg.version == 1
              else "mPLUG-Owl2's LLM (MPLUGOwl2LlamaForCausalLM)")
    return save_peft_lora(dst, adapter, peft_cfg, owl_peft_modules(cfg), target=target, base_model=base_model)
