"""Shared fixtures for the LLaMA / mPLUG-Owl tests: tiny random HF checkpoints and a param loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aurora_jax.models.llama import LlamaConfig

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4)


def rel_err(a, b) -> float:
    """||a - b|| / ||b||."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def t2n(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def make_hf_llama(seed: int = 0, **overrides):
    """A random float32 transformers LlamaForCausalLM with a tiny config."""
    import transformers

    torch.manual_seed(seed)
    kw = dict(TINY, rms_norm_eps=1e-6, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    config = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(config).float().eval()
    # Random norm scales so a wrong norm placement cannot hide behind all-ones weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def llama_params_from_torch(sd: dict[str, torch.Tensor], cfg: LlamaConfig, prefix: str = "") -> dict:
    """HF LlamaForCausalLM state dict -> our params (test-only loader, independent of aurora_jax.convert)."""
    g = lambda k: t2n(sd[prefix + k])  # noqa: E731
    p = {"embed_tokens": {"embedding": g("model.embed_tokens.weight")}, "final_norm": {"scale": g("model.norm.weight")}}
    if not cfg.tie_embeddings:
        p["lm_head"] = {"kernel": g("lm_head.weight").T}
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        attn = {n: {"kernel": g(pre + f"self_attn.{n}.weight").T} for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        mlp = {n: {"kernel": g(pre + f"mlp.{n}.weight").T} for n in ("gate_proj", "up_proj", "down_proj")}
        p[f"layer_{i}"] = {
            "attn": attn,
            "mlp": mlp,
            "input_norm": {"scale": g(pre + "input_layernorm.weight")},
            "post_attn_norm": {"scale": g(pre + "post_attention_layernorm.weight")},
        }
    return p


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_llama(0)


@pytest.fixture(scope="module")
def llama_pair(hf_llama):
    """(torch model, our config, our params) for the tiny MHA config."""
    cfg = LlamaConfig.from_hf(hf_llama.config.to_dict())
    return hf_llama, cfg, llama_params_from_torch(hf_llama.state_dict(), cfg)
