"""Shared fixtures for the LLaMA / mPLUG-Owl tests: tiny random checkpoints and comparison helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aurora_jax.convert.keymap import KeyMap
from aurora_jax.convert.readers import DictSource
from aurora_jax.models.abstractor import AbstractorConfig
from aurora_jax.models.llama import LlamaConfig
from aurora_jax.models.owl import OwlConfig, owl_vit_config
from tests.owl.torch_ref import RefAbstractor, RefMWLlama, RefOwl1, RefOwl2, RefViT

# 2 layers, hidden 64: small enough for the 512-token prompt on a shared 2-core machine.
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def rel_err(a, b) -> float:
    """||a - b|| / ||b||."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def t2n(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def randomize_norms(model: torch.nn.Module) -> None:
    """Norm scales away from 1 (and biases away from 0), so a misplaced norm cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ffn_ln" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))


def make_hf_llama(seed: int = 0, **overrides):
    """A random float32 transformers LlamaForCausalLM with a tiny config."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM(config).float().eval()
    randomize_norms(model)
    return model


def save_torch_shards(sd: dict[str, torch.Tensor], folder: Path, n: int, config: dict | None = None) -> Path:
    """`pytorch_model-0000K-of-0000N.bin` shards + `pytorch_model.bin.index.json` (as Owl2 ships)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for k in range(n):
        name = f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin"
        part = {key: sd[key].clone().contiguous() for key in keys[k::n]}
        torch.save(part, folder / name)
        weight_map.update({key: name for key in part})
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def convert_sd(keymap: KeyMap, sd: dict[str, torch.Tensor], target) -> dict:
    """Params from an in-memory state dict through a key map (full key accounting included)."""
    return keymap.convert(DictSource(sd), target)


IMG, PATCH, D_VIT, QUERIES = 16, 4, 32, 6
K = QUERIES + 1  # visual tokens per image


# Owl2's LLM in the tests: GQA and the modality-adaptive module, small enough to run everywhere.
TINY_OWL2_LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, rms_eps=1e-5, modality_adaptive=True)


def tiny_owl_config(version: int) -> OwlConfig:
    d_llm = 32 if version == 2 else TINY_LLAMA["hidden_size"]
    if version == 2:
        llm = TINY_OWL2_LLM
    else:
        llm = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4)
    return OwlConfig(
        version=version,
        vision=owl_vit_config(
            IMG, patch_size=PATCH, hidden_size=D_VIT, num_heads=2, mlp_dim=64, num_layers=2
        ),
        abstractor=AbstractorConfig(
            version=version,
            hidden_size=D_VIT,
            num_layers=2,
            num_heads=2,
            intermediate_size=48,
            num_queries=QUERIES,
            output_size=d_llm,
            grid_size=IMG // PATCH,
        ),
        llm=llm,
    )


def make_owl_ref(version: int, seed: int = 0):
    torch.manual_seed(seed)
    vit = RefViT(d=D_VIT, heads=2, mlp=64, layers=2, patch=PATCH, image_size=IMG)
    if version == 2:
        abstractor = RefAbstractor(
            2, d=D_VIT, heads=2, ffn=48, layers=2, queries=QUERIES, out=32, grid=IMG // PATCH
        )
        ref = RefOwl2(
            RefMWLlama(vocab=64, d=32, heads=4, kv_heads=2, ffn=48, layers=2, eps=1e-5), vit, abstractor
        )
    else:
        abstractor = RefAbstractor(
            1,
            d=D_VIT,
            heads=2,
            ffn=48,
            layers=2,
            queries=QUERIES,
            out=TINY_LLAMA["hidden_size"],
            grid=IMG // PATCH,
            own_queries=False,
        )
        ref = RefOwl1(make_hf_llama(seed), vit, abstractor, QUERIES, D_VIT)
    randomize_norms(ref)
    return ref.eval()


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_llama(0)
