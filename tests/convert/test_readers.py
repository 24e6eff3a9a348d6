"""Lazy tensor sources: formats, wrappers, dtypes, streaming, and clear errors for non-checkpoints."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from aurora_jax.convert import keymap as km
from aurora_jax.convert.readers import (
    CheckpointFormatError,
    DictSource,
    SafetensorsSource,
    TorchSource,
    open_checkpoint,
)

STATE = {"a.weight": torch.arange(12.0).reshape(3, 4), "b.bias": torch.ones(2), "n": torch.tensor(7)}


def _check(source):
    assert sorted(source.keys()) == ["a.weight", "b.bias", "n"]
    assert source.shape("a.weight") == (3, 4) and source.dtype("a.weight") == "float32"
    np.testing.assert_array_equal(source.read("a.weight"), STATE["a.weight"].numpy())
    assert isinstance(source.read("n"), np.ndarray)


def test_hf_folders(hf_blip, hf_blip_variants):
    assert isinstance(open_checkpoint(hf_blip["vqa"][1]), SafetensorsSource)
    sharded = open_checkpoint(hf_blip_variants["safetensors_sharded"])
    assert isinstance(sharded, SafetensorsSource) and len(sharded.files) > 1
    assert isinstance(open_checkpoint(hf_blip_variants["bin"]), TorchSource)
    bins = open_checkpoint(hf_blip_variants["bin_sharded"] / "pytorch_model.bin.index.json")
    assert isinstance(bins, TorchSource) and len(bins.files) == 3
    assert set(bins.keys()) == set(open_checkpoint(hf_blip_variants["bin"]).keys())


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_torch_file_wrappers(tmp_path, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(STATE if wrap is None else {wrap: STATE, "epoch": 3}, path)
    _check(open_checkpoint(path))


def test_legacy_torch_pickle_without_mmap(tmp_path):
    path = tmp_path / "old.bin"
    torch.save(STATE, path, _use_new_zipfile_serialization=False)
    _check(open_checkpoint(path))


def test_safetensors_file_and_bfloat16(tmp_path):
    save_file({**STATE, "h": torch.ones(2, 2, dtype=torch.bfloat16)}, tmp_path / "w.safetensors")
    src = open_checkpoint(tmp_path / "w.safetensors")
    assert src.dtype("h") == "bfloat16"
    assert src.read("h").dtype == ml_dtypes.bfloat16
    torch.save({"h": torch.full((2,), 1.5, dtype=torch.bfloat16)}, tmp_path / "h.pth")
    h = open_checkpoint(tmp_path / "h.pth").read("h")
    np.testing.assert_array_equal(h.astype(np.float32), [1.5, 1.5])


def test_conversion_reads_each_tensor_once_and_ignored_never():
    reads = []

    class Counting(DictSource):
        def read(self, key):
            reads.append(key)
            return super().read(key)

    src = Counting({"w": np.ones((2, 3), np.float32), "skip": np.zeros(5, np.float32)})
    kmap = km.KeyMap([km.rule("d/kernel", "w", km.linear())], [km.ignore("skip", "test")])
    kmap.convert(src, {"d": {"kernel": np.zeros((3, 2), np.float32)}})
    assert reads == ["w"]


@pytest.mark.parametrize("name", ["model.safetensors", "model_base.pth", "pytorch_model.bin"])
def test_random_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointFormatError, match=name):
        open_checkpoint(tmp_path if name != "model_base.pth" else path)


def test_corrupt_zip(tmp_path):
    torch.save(STATE, tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:300])
    with pytest.raises(CheckpointFormatError, match="cut.pth is not a readable PyTorch checkpoint"):
        open_checkpoint(tmp_path / "cut.pth")


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointFormatError, match=str(tmp_path)):
        open_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint extension"):
        open_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.pth")
    torch.save({"epoch": 3, "args": {"lr": 1e-4}}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointFormatError, match="meta.pth holds no state dict"):
        open_checkpoint(tmp_path / "meta.pth")


def test_index_errors(tmp_path):
    index = {"weight_map": {"a": "model-1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match="model-1.safetensors"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match="index.json"):
        open_checkpoint(tmp_path)


def test_ambiguous_folder(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.ones(1)}, tmp_path / name)
    with pytest.raises(CheckpointFormatError, match="a.safetensors"):
        open_checkpoint(tmp_path)


def test_stream_releases_each_tensor_after_its_last_read(tmp_path):
    """A weight read by two rules (a tied fallback) stays readable until the second; then it is dropped."""
    torch.save({"emb": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, tmp_path / "m.pth")
    src = open_checkpoint(tmp_path / "m.pth")
    target = {"e": np.zeros((2, 3), np.float32), "head": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}
    kmap = km.KeyMap([km.rule("e", "emb"), km.rule("b", "b"), km.rule("head", "emb", km.linear())])
    out = kmap.convert(src, target)
    np.testing.assert_array_equal(out["head"], np.arange(6.0).reshape(2, 3).T)
    assert src.shape("emb") == (2, 3)  # metadata survives the release
    with pytest.raises(KeyError, match="'emb' was released"):
        src.read("emb")


def test_safetensors_location_orders_by_file_then_offset(hf_blip_variants):
    src = open_checkpoint(hf_blip_variants["safetensors_sharded"])
    order = sorted(src.keys(), key=src.location)
    assert [src.location(k)[0] for k in order] == sorted(src.location(k)[0] for k in order)
    assert len({src.location(k)[0] for k in order}) == len(src.files) > 1
