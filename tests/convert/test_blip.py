"""BLIP conversion: HF folders (all formats), Salesforce .pth, position-table resize, errors, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from aurora_jax.convert import keymap as km
from aurora_jax.convert.blip import (
    BLIP_TEMP_REASON,
    blip_keymap,
    config_from_hf,
    convert_blip,
    export_blip_hf,
    load_blip,
    salesforce_to_hf,
    save_blip_hf,
)
from aurora_jax.convert.readers import DictSource
from aurora_jax.models.blip import abstract_params
from tests.fixtures import (
    HF_BLIP_CLASSES,
    assert_trees_equal,
    hf_to_salesforce,
    salesforce_state,
    state_dict_np,
    tiny_hf_blip_config,
)


def leaves(tree) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def converted(hf_blip):
    return {task: load_blip(folder) for task, (_, folder) in hf_blip.items()}


@pytest.mark.parametrize("task", ["retrieval", "vqa", "caption"])
def test_hf_fills_every_leaf(converted, hf_blip, task):
    cfg, params = converted[task]
    assert cfg.task == task
    want = km.abstract_shapes(abstract_params(cfg))
    got = {k: (v.shape, v.dtype) for k, v in leaves(params).items()}
    assert got == want
    # Every HF tensor value lands somewhere (a missing rule would leave init values, a swap wrong ones).
    ours = [np.asarray(v).ravel() for v in leaves(params).values()]
    ours_sorted = np.sort(np.concatenate(ours))
    for key, value in state_dict_np(hf_blip[task][0]).items():
        if "position_ids" in key:
            continue
        idx = np.searchsorted(ours_sorted, value.ravel())
        assert np.all(ours_sorted[np.minimum(idx, len(ours_sorted) - 1)] == value.ravel()), key


def test_hf_values_after_layout_changes(converted, hf_blip):
    cfg, p = converted["retrieval"]
    sd = state_dict_np(hf_blip["retrieval"][0])
    v = p["visual_encoder"]
    np.testing.assert_array_equal(v["patch_embed"]["kernel"],
                                  sd["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["layer_1"]["attn"]["qkv"]["kernel"],
                                  sd["vision_model.encoder.layers.1.self_attn.qkv.weight"].T)
    np.testing.assert_array_equal(v["layer_0"]["attn"]["proj"]["bias"],
                                  sd["vision_model.encoder.layers.0.self_attn.projection.bias"])
    np.testing.assert_array_equal(v["final_norm"]["scale"], sd["vision_model.post_layernorm.weight"])
    np.testing.assert_array_equal(v["cls_token"], sd["vision_model.embeddings.class_embedding"])
    t = p["text_encoder"]["layer_1"]
    np.testing.assert_array_equal(t["cross_attn"]["value"]["kernel"],
                                  sd["text_encoder.encoder.layer.1.crossattention.self.value.weight"].T)
    np.testing.assert_array_equal(t["self_attn"]["out_norm"]["bias"],
                                  sd["text_encoder.encoder.layer.1.attention.output.LayerNorm.bias"])
    np.testing.assert_array_equal(t["ffn"]["output"]["kernel"],
                                  sd["text_encoder.encoder.layer.1.output.dense.weight"].T)
    np.testing.assert_array_equal(p["itm_head"]["kernel"], sd["itm_head.weight"].T)
    assert p["temp"].shape == () and p["temp"] == np.float32(0.07)  # constant rule: HF has no temp


def test_hf_tied_decoder(converted, hf_blip):
    _, p = converted["caption"]
    sd = state_dict_np(hf_blip["caption"][0])
    head = p["text_decoder"]["lm_head"]
    np.testing.assert_array_equal(head["decoder"]["kernel"],
                                  sd["text_decoder.bert.embeddings.word_embeddings.weight"].T)
    np.testing.assert_array_equal(head["decoder"]["bias"], sd["text_decoder.cls.predictions.bias"])


@pytest.mark.parametrize("variant", ["safetensors_sharded", "bin", "bin_sharded"])
def test_hf_file_formats_agree(converted, hf_blip_variants, variant):
    cfg, params = load_blip(hf_blip_variants[variant])
    assert cfg == converted["vqa"][0]
    assert_trees_equal(params, converted["vqa"][1])


def test_dtype_bfloat16(hf_blip):
    _, params = load_blip(hf_blip["caption"][1], dtype="bfloat16")
    assert {str(v.dtype) for v in leaves(params).values()} == {"bfloat16"}


def test_config_from_hf(hf_blip):
    cfg = config_from_hf(hf_blip["retrieval"][0].config.to_dict(), "retrieval")
    v = cfg.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.image_size) == (32, 2, 4, 32)
    assert (cfg.text.vocab_size, cfg.text.num_heads, cfg.text.max_position_embeddings) == (100, 4, 64)
    assert (cfg.embed_dim, cfg.bos_token_id, cfg.enc_token_id, cfg.sep_token_id) == (16, 98, 99, 3)
    assert cfg.vision.eps == 1e-6 and cfg.text.eps == 1e-12


# ----------------------------------------------------------------------------------------- Salesforce


def test_salesforce_renames():
    assert salesforce_to_hf("visual_encoder.blocks.3.attn.proj.weight") == \
        "vision_model.encoder.layers.3.self_attn.projection.weight"
    assert salesforce_to_hf("visual_encoder_m.norm.bias") == "momentum.vision_model.post_layernorm.bias"
    assert salesforce_to_hf("text_proj_m.weight") == "momentum.text_proj.weight"
    assert salesforce_to_hf("text_encoder.encoder.layer.0.output.dense.weight") == \
        "text_encoder.encoder.layer.0.output.dense.weight"
    for key in ("vision_model.embeddings.patch_embedding.bias",
                "vision_model.encoder.layers.1.layer_norm2.weight",
                "vision_model.encoder.layers.0.mlp.fc2.weight"):
        assert salesforce_to_hf(hf_to_salesforce(key)) == key


@pytest.fixture(scope="module")
def salesforce_pth(hf_blip, tmp_path_factory):
    """model_base-like .pth: {'model': sd} with momentum copies, queues, temp and the caption decoder."""
    hf = state_dict_np(hf_blip["retrieval"][0])
    sd = salesforce_state(hf, momentum=True, decoder_from=state_dict_np(hf_blip["caption"][0]))
    path = tmp_path_factory.mktemp("sf") / "model_base.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 3}, path)
    return path, sd


def test_salesforce_matches_hf(salesforce_pth, converted):
    path, _ = salesforce_pth
    c = convert_blip(path, task="retrieval", vision_heads=4, text_heads=4)
    hf_cfg, hf_params = converted["retrieval"]
    assert c.source_format == "salesforce" and c.extras is None
    assert c.config.vision == hf_cfg.vision and c.config.embed_dim == hf_cfg.embed_dim
    assert c.config.text.num_layers == 2 and c.config.text.vocab_size == 100
    want = dict(hf_params, temp=np.float32(0.05))  # the checkpoint's own temp wins over the constant
    assert_trees_equal(c.params, want)
    # Explicitly ignored, with reasons: decoder of model_base, momentum copies, queues, buffers.
    assert any(k.startswith("text_decoder.") for k in c.ignored)
    assert "image_queue" in c.ignored and "text_encoder.embeddings.position_ids" in c.ignored
    assert any(k.startswith("momentum.vision_model") for k in c.ignored)


def test_salesforce_momentum_extras(salesforce_pth, converted):
    path, sd = salesforce_pth
    cfg, params, extras = load_blip(path, task="retrieval", momentum=True)
    _, hf_params = converted["retrieval"]
    assert set(extras["momentum"]) == {"visual_encoder", "text_encoder", "vision_proj", "text_proj"}
    for part, tree in extras["momentum"].items():
        shifted = {k: v + 1.0 for k, v in leaves(hf_params[part]).items()}
        got = leaves(tree)
        assert got.keys() == shifted.keys()
        for k in got:
            np.testing.assert_allclose(got[k], shifted[k], rtol=0, atol=1e-6, err_msg=f"{part}/{k}")
    np.testing.assert_array_equal(extras["queues"]["image_queue"], sd["image_queue"].numpy())
    assert extras["queues"]["ptr_queue"].dtype == np.int64


def test_salesforce_vqa_from_base_ignores_retrieval_heads(salesforce_pth, converted):
    path, _ = salesforce_pth
    c = convert_blip(path, task="vqa")
    assert {"vision_proj.weight", "itm_head.bias", "temp"} <= set(c.ignored)
    # model_base's text encoder becomes the VQA question encoder.
    assert_trees_equal(c.params["text_encoder"], converted["retrieval"][1]["text_encoder"])


def test_salesforce_pos_embed_resize(salesforce_pth):
    path, sd = salesforce_pth
    cfg, params = load_blip(path, task="retrieval", image_size=48)
    assert cfg.vision.image_size == 48
    pos = params["visual_encoder"]["pos_embed"]
    assert pos.shape == (1, 1 + 6 * 6, 32)
    # Reference: BLIP resizes the patch grid with torch's bicubic interpolation (align_corners=False).
    old = sd["visual_encoder.pos_embed"]
    grid = old[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    new = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    want = torch.cat([old[:, :1], new.permute(0, 2, 3, 1).reshape(1, 36, 32)], dim=1).numpy()
    np.testing.assert_allclose(pos, want, rtol=1e-5, atol=1e-6)


def test_hf_pos_embed_resize(hf_blip):
    cfg, params = load_blip(hf_blip["caption"][1], image_size=48)
    assert cfg.vision.image_size == 48 and params["visual_encoder"]["pos_embed"].shape == (1, 37, 32)


# --------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def vqa_state(hf_blip):
    return hf_blip["vqa"][0].config, state_dict_np(hf_blip["vqa"][0])


def _convert_dict(state, hf_config):
    cfg = config_from_hf(hf_config.to_dict(), "vqa")
    return convert_blip(DictSource(state, "tiny-vqa"), config=cfg)


def test_error_names_missing_extra_and_misshaped_keys(vqa_state):
    hf_config, state = vqa_state
    state = dict(state)
    del state["text_encoder.encoder.layer.1.crossattention.self.key.bias"]
    state["text_encoder.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
    state["vision_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((65, 32), np.float32)
    with pytest.raises(km.KeyMapError) as e:
        _convert_dict(state, hf_config)
    msg = str(e.value)
    assert "tiny-vqa" in msg
    assert "text_encoder.encoder.layer.1.crossattention.self.key.bias" in msg
    assert "text_encoder/layer_1/cross_attn/key/bias" in msg
    assert "text_encoder.pooler.dense.weight" in msg and "[32, 32]" in msg
    assert "visual_encoder/layer_0/mlp/fc1/kernel: expected [32, 64], got [32, 65]" in msg
    assert len(e.value.missing) == len(e.value.unexpected) == len(e.value.mismatched) == 1


def test_error_layer_count_mismatch(vqa_state):
    hf_config, state = vqa_state
    state = {k: v for k, v in state.items() if ".layers.1." not in k}
    with pytest.raises(km.KeyMapError) as e:
        _convert_dict(state, hf_config)
    assert "vision_model.encoder.layers.1.self_attn.qkv.weight" in str(e.value)


def test_error_wrong_task(hf_blip):
    with pytest.raises(km.KeyMapError) as e:
        load_blip(hf_blip["caption"][1], task="retrieval")
    msg = str(e.value)
    assert "itm_head.weight" in msg and "text_decoder.cls.predictions.bias" in msg


def test_error_momentum_missing(hf_blip):
    with pytest.raises(km.KeyMapError, match=r"momentum\.vision_model\.embeddings\.class_embedding"):
        load_blip(hf_blip["retrieval"][1], momentum=True)


# --------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("task", ["retrieval", "vqa", "caption"])
def test_export_round_trip(converted, hf_blip, task, tmp_path):
    cfg, params = converted[task]
    want = {k: v for k, v in state_dict_np(hf_blip[task][0]).items()
            if "position_ids" not in k and not k.endswith("predictions.decoder.bias")}
    got = export_blip_hf(cfg, params)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # And PyTorch users can load it.
    save_blip_hf(tmp_path, cfg, params)
    model = getattr(transformers, HF_BLIP_CLASSES[task]).from_pretrained(tmp_path)
    for k, v in state_dict_np(model).items():
        if k in want:
            np.testing.assert_array_equal(v, want[k], err_msg=k)
    assert model.config.vision_config.layer_norm_eps == cfg.vision.eps


def test_temp_rule_is_a_documented_constant():
    cfg = config_from_hf(tiny_hf_blip_config().to_dict(), "retrieval")
    (r,) = [r for r in blip_keymap(cfg).rules if r.targets == ("temp",)]
    const = r.alternatives[-1].transform
    assert isinstance(const, km.Constant) and const.reason == BLIP_TEMP_REASON and not r.export
