"""Shared test set-up: 8 fake CPU devices for sharding tests, float32 everywhere; session-wide checkpoints."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.fixtures import (  # noqa: E402
    HF_BLIP_CLASSES,
    make_hf_blip,
    make_hf_llama,
    save_torch_shards,
    write_tokenizer_files,
)


@pytest.fixture(scope="session")
def hf_blip(tmp_path_factory):
    """task -> (torch model, folder with config.json + model.safetensors); retrieval adds tokenizer files."""
    out = {}
    for seed, task in enumerate(HF_BLIP_CLASSES):
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
    sharded_bin = save_torch_shards(model.state_dict(), tmp_path_factory.mktemp("hf_vqa_bin_sharded"), 3)
    for f in (single_bin, sharded_bin):
        (f / "config.json").write_text((folder / "config.json").read_text())
    return {"safetensors_sharded": sharded, "bin": single_bin, "bin_sharded": sharded_bin}


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_llama(0)
