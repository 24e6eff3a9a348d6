"""Tiny random HF BLIP checkpoints on disk (session-scoped), shared by the conversion and model tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

TASK_CLASSES = {
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
    "caption": "BlipForConditionalGeneration",
}
VOCAB = [f"tok{i}" for i in range(100)]


def tiny_hf_config(image_size: int = 32):
    import transformers

    return transformers.BlipConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=image_size, patch_size=8, layer_norm_eps=1e-6),
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100, encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=98,
                         sep_token_id=3, pad_token_id=0, eos_token_id=2),
        image_text_hidden_size=16,
    )


def make_hf_blip(task: str, seed: int = 0, image_size: int = 32):
    """A tiny BLIP task model with every parameter random (no all-ones norms or zero biases to hide swaps)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, TASK_CLASSES[task])(tiny_hf_config(image_size)).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # tied parameters are one object: they stay tied
            p.normal_(0.0, 0.5)
    return model


def state_dict_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def write_tokenizer_files(folder: Path) -> None:
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))


def save_torch_shards(state: dict, folder: Path, num_shards: int) -> None:
    """An HF-style sharded pytorch_model-K-of-N.bin set with its index (transformers 5 writes no .bin)."""
    keys = list(state)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(keys)), num_shards)):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        torch.save({keys[j]: state[keys[j]] for j in chunk}, folder / name)
        weight_map.update({keys[j]: name for j in chunk})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="session")
def hf_blip(tmp_path_factory):
    """task -> (torch model, folder with config.json + model.safetensors); retrieval adds tokenizer files."""
    out = {}
    for seed, task in enumerate(TASK_CLASSES):
        model = make_hf_blip(task, seed)
        folder = tmp_path_factory.mktemp(f"hf_{task}")
        model.save_pretrained(folder)
        if task == "retrieval":
            write_tokenizer_files(folder)
        out[task] = (model, folder)
    return out


@pytest.fixture(scope="session")
def hf_blip_variants(hf_blip, tmp_path_factory):
    """The VQA model saved as sharded safetensors, a single pytorch_model.bin and sharded .bin files."""
    model, folder = hf_blip["vqa"]
    sharded = tmp_path_factory.mktemp("hf_vqa_sharded")
    model.save_pretrained(sharded, max_shard_size="20KB")
    single_bin = tmp_path_factory.mktemp("hf_vqa_bin")
    # A plain state dict keeps the tied decoder weight: the converter must accept it too.
    torch.save(model.state_dict(), single_bin / "pytorch_model.bin")
    sharded_bin = tmp_path_factory.mktemp("hf_vqa_bin_sharded")
    save_torch_shards(model.state_dict(), sharded_bin, 3)
    for f in (single_bin, sharded_bin):
        (f / "config.json").write_text((folder / "config.json").read_text())
    return {"safetensors_sharded": sharded, "bin": single_bin, "bin_sharded": sharded_bin}


# HF -> Salesforce names, written from the renames documented for transformers' BLIP port
# (visual_encoder -> vision_model, blocks -> encoder.layers, attn.proj -> self_attn.projection, ...),
# independently of aurora_jax.convert.blip so the test checks the converter's renames.
_HF_TO_SF_VIT = [
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding", "pos_embed"),
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"post_layernorm\.", "norm."),
    (r"encoder\.layers\.(\d+)\.", r"blocks.\1."),
    (r"layer_norm1", "norm1"),
    (r"layer_norm2", "norm2"),
    (r"self_attn\.qkv", "attn.qkv"),
    (r"self_attn\.projection", "attn.proj"),
]


def hf_to_salesforce(key: str) -> str:
    if not key.startswith("vision_model."):
        return key
    rest = key[len("vision_model."):]
    for pattern, repl in _HF_TO_SF_VIT:
        rest = re.sub(pattern, repl, rest)
    return "visual_encoder." + rest


def salesforce_state(hf_state: dict[str, np.ndarray], *, momentum: bool, temp: float = 0.05,
                     decoder_from: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """A Salesforce-layout retrieval state dict: renamed keys, temp, buffers, *_m copies and queues."""
    sd = {hf_to_salesforce(k): torch.from_numpy(v) for k, v in hf_state.items()}
    sd["temp"] = torch.tensor(temp)
    sd["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    if momentum:
        for k, v in list(sd.items()):
            head, _, rest = k.partition(".")
            online = head in ("visual_encoder", "text_encoder", "vision_proj", "text_proj")
            if online and "position_ids" not in k:
                sd[f"{head}_m.{rest}"] = v + 1.0  # distinguishable from the online weights
        sd["image_queue"] = torch.randn(16, 40)
        sd["text_queue"] = torch.randn(16, 40)
        sd["idx_queue"] = torch.full((1, 40), -100)
        sd["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    if decoder_from is not None:  # model_base.pth also holds the captioning decoder
        sd.update({k: torch.from_numpy(v) for k, v in decoder_from.items() if k.startswith("text_decoder.")})
    return sd
