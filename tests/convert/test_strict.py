"""Strict converters: integer / bool / complex tensors into float leaves and NaN / Inf are refused by name."""

from __future__ import annotations

import copy
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from aurora_jax.convert import cli
from aurora_jax.convert import keymap as km
from aurora_jax.convert.blip import cli as blip_cli
from aurora_jax.convert.blip import load_blip
from aurora_jax.convert.llama import convert_llama
from aurora_jax.convert.readers import DictSource
from tests.fixtures import make_hf_llama, salesforce_state, state_dict_np

FC1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
QKV = "vision_model.encoder.layers.1.self_attn.qkv.weight"
BIAS = "text_encoder.encoder.layer.0.attention.self.query.bias"
EMBED = "text_encoder.embeddings.word_embeddings.weight"


def hf_folder_with(tmp_path, model, replace: dict[str, torch.Tensor]):
    """The model's state dict written as an HF folder (model.safetensors + config.json), some tensors replaced."""
    tmp_path.mkdir()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # ties cloned apart
    sd.update(replace)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    return tmp_path


def assert_nothing_written(dst):
    assert not dst.exists() or sorted(p.name for p in dst.iterdir()) == [], sorted(dst.iterdir())


# ----------------------------------------------------------------------------------------------- dtypes


def test_blip_hf_integer_and_bool_tensors_are_refused_by_name(hf_blip, tmp_path):
    model = hf_blip["vqa"][0]
    sd = model.state_dict()
    folder = hf_folder_with(tmp_path / "hf", model, {
        FC1: sd[FC1].round().to(torch.int64),  # whole-number floats would hide a broken export
        BIAS: sd[BIAS] > 0,
        "text_encoder.embeddings.position_ids": torch.arange(64)[None],  # an int64 buffer: ignored, fine
    })
    with pytest.raises(km.KeyMapError) as e:
        load_blip(folder)
    msg = str(e.value)
    assert "source dtypes the target leaf cannot hold without loss" in msg
    assert f"'{FC1}' int64 -> visual_encoder/layer_0/mlp/fc1/kernel float32" in msg
    assert f"'{BIAS}' bool -> text_encoder/layer_0/self_attn/query/bias float32" in msg
    assert len(e.value.bad_dtype) == 2 and "position_ids" not in msg
    # The CLI refuses it before writing anything.
    dst = tmp_path / "out"
    with pytest.raises(km.KeyMapError, match="int64"):
        blip_cli(["--src", str(folder), "--dst", str(dst), "--no-progress"])
    assert_nothing_written(dst)


def test_complex_and_unknown_dtypes_are_refused():
    target = {"w": np.zeros((2, 2), np.float32), "n": np.zeros((), np.int32)}
    kmap = km.KeyMap([km.rule("w", "w"), km.rule("n", "n")])
    src = DictSource({"w": np.ones((2, 2), np.complex64), "n": np.array(3, np.int64)}, "toy")
    with pytest.raises(km.KeyMapError) as e:
        kmap.plan(src, target)
    assert e.value.bad_dtype == ["'w' complex64 -> w float32", "'n' int64 -> n int32"]  # int64 -> int32 may wrap
    assert not km.lossless("f8_e4m3_unknown", np.dtype(np.float32))
    assert km.lossless("bfloat16", np.dtype(np.float32)) and km.lossless("float8_e4m3fn", np.dtype(np.float16))
    assert km.lossless("int32", np.dtype(np.int64)) and km.lossless("bool", np.dtype(np.int64))


def test_integer_queues_stay_integers(hf_blip, tmp_path):
    """Salesforce idx_queue / ptr_queue are int64 buffers kept as int64 extras: not refused."""
    sd = salesforce_state(state_dict_np(hf_blip["retrieval"][0]), momentum=True)
    torch.save({"model": sd}, tmp_path / "model.pth")
    _, _, extras = load_blip(tmp_path / "model.pth", task="retrieval", momentum=True)
    assert extras["queues"]["idx_queue"].dtype == np.int64
    np.testing.assert_array_equal(extras["queues"]["idx_queue"], sd["idx_queue"].numpy())


def test_llama_integer_weight_is_refused(tmp_path):
    hf = make_hf_llama(3)
    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = (sd["lm_head.weight"] * 100).to(torch.int32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    with pytest.raises(km.KeyMapError, match=r"'lm_head\.weight' int32 -> lm_head/kernel float32"):
        convert_llama(tmp_path)


# -------------------------------------------------------------------------------------------- non-finite


def test_blip_hf_nan_and_inf_are_refused_with_counts(hf_blip, tmp_path):
    model = copy.deepcopy(hf_blip["caption"][0])
    with torch.no_grad():
        params = dict(model.named_parameters())
        params["vision_model.encoder.layers.1.self_attn.qkv.weight"][0, :3] = float("nan")
        params["text_decoder.bert.embeddings.word_embeddings.weight"][5, 0] = float("inf")
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(km.KeyMapError) as e:
        load_blip(tmp_path / "hf")
    msg = str(e.value)
    assert "holds values the model cannot use" in msg and "2 tensors with non-finite values" in msg
    n_qkv = params[QKV].numel()
    assert f"'{QKV}' float32: 3 of {n_qkv} values are NaN or Inf" in msg
    assert "'text_decoder.bert.embeddings.word_embeddings.weight' float32: 1 of" in msg
    # The CLI streams into the folder: a refused conversion leaves nothing behind (no temporary folder).
    dst = tmp_path / "out"
    with pytest.raises(km.KeyMapError, match="NaN or Inf"):
        blip_cli(["--src", str(tmp_path / "hf"), "--dst", str(dst), "--no-progress"])
    assert_nothing_written(dst)


def test_llama_sharded_nan_refused_and_nothing_written(tmp_path):
    hf = make_hf_llama(4)
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[2, 7] = float("nan")
        hf.model.norm.weight[0] = float("-inf")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    with pytest.raises(km.KeyMapError) as e:
        convert_llama(tmp_path / "hf", dtype="bfloat16")
    assert sorted(k.split(" ")[0] for k in e.value.non_finite) == [
        "'model.layers.1.mlp.up_proj.weight'", "'model.norm.weight'"]
    dst = tmp_path / "out"
    with pytest.raises(km.KeyMapError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        cli.main(["llama", "--src", str(tmp_path / "hf"), "--dst", str(dst), "--no-progress"])
    assert_nothing_written(dst)


def test_narrowing_cast_overflow_is_refused():
    big = np.full((2, 3), 1e5, np.float32)  # finite in float32, Inf in float16
    kmap = km.KeyMap([km.rule("d/kernel", "w", km.linear())])
    target = {"d": {"kernel": np.zeros((3, 2), np.float32)}}
    with pytest.raises(km.KeyMapError, match=r"'w' float32: 6 values overflow to Inf in float16 \(for d/kernel\)"):
        kmap.convert(DictSource({"w": big}), target, dtype="float16")
    assert kmap.convert(DictSource({"w": big}), target, dtype="bfloat16")["d"]["kernel"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "float8_e4m3fn"])
def test_count_non_finite(dtype):
    x = np.linspace(-3, 3, 7 * 100_003).astype(np.float32)  # more than one check chunk
    x[[0, 10, 699_999]] = np.nan
    if dtype != "float8_e4m3fn":  # e4m3fn has no Inf
        x[5] = np.inf
        x[6] = -np.inf
    y = x.astype(km.np_dtype(dtype))
    assert km.count_non_finite(y) == int(np.count_nonzero(~np.isfinite(x)))
    strided = y.reshape(7, -1)[:, ::2]
    assert km.count_non_finite(strided) == int(np.count_nonzero(~np.isfinite(x.reshape(7, -1)[:, ::2])))
    assert km.count_non_finite(np.arange(5)) == 0
