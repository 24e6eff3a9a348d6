"""Key maps for `llama`, `mplug-owl`, `mplug-owl2`: source layouts, key accounting, round trips, CLI."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from aurora_jax.convert import cli, store
from aurora_jax.convert.keymap import KeyMapError
from aurora_jax.convert.llama import convert_llama, export_llama, llama_keymap
from aurora_jax.convert.owl import convert_owl, export_owl, owl_keymap
from aurora_jax.convert.readers import DictSource
from aurora_jax.models import llama, owl
from aurora_jax.models.abstractor import sincos_1d, sincos_2d
from tests.fixtures import (
    REF_IMG,
    assert_trees_equal,
    convert_sd,
    make_hf_llama,
    make_owl_ref,
    ref_owl_config,
    save_torch_shards,
    state_dict_np,
)


def _assert_export(exported: dict, sd: dict, skip=()):
    assert set(exported) == set(sd) - set(skip)
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def _convert_bf16_with_cli(source: str, src, dst) -> tuple:
    """`python -m aurora_jax.convert <source> --dtype bfloat16`, then the folder it wrote."""
    rc = cli.main([source, "--src", str(src), "--dst", str(dst), "--dtype", "bfloat16", "--no-progress"])
    assert rc == 0
    return store.load_converted(dst)


# --------------------------------------------------------------------------------------------- llama


@pytest.fixture(scope="module")
def hf_gqa():
    return make_hf_llama(7, num_key_value_heads=2)


def test_llama_sharded_safetensors_and_bins_agree(tmp_path, hf_gqa):
    sd = hf_gqa.state_dict()
    hf_gqa.save_pretrained(tmp_path / "st", max_shard_size="40KB")
    assert (tmp_path / "st" / "model.safetensors.index.json").is_file()
    save_torch_shards(sd, tmp_path / "bin", 3, config=hf_gqa.config.to_dict())
    cfg, from_st = convert_llama(tmp_path / "st")
    cfg_bin, from_bin = convert_llama(tmp_path / "bin")
    assert cfg == cfg_bin and cfg.num_kv_heads == 2
    assert_trees_equal(from_st, from_bin)
    assert_trees_equal(from_st, convert_sd(llama_keymap(cfg), sd, llama.abstract_params(cfg)))
    # Round trip back to the HF layout is exact.
    _assert_export(export_llama(cfg, from_st), state_dict_np(hf_gqa))


def test_llama_bf16_and_tied(tmp_path):
    hf = make_hf_llama(8, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    cfg, params = convert_llama(tmp_path, dtype="bfloat16")
    assert cfg.tie_embeddings and "lm_head" not in params
    leaves = jax.tree_util.tree_leaves(params)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in leaves)
    want = hf.model.embed_tokens.weight.detach().numpy().astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], want)
    # A tied checkpoint that still stores lm_head.weight converts (the key is accounted as ignored).
    sd = {**hf.state_dict(), "lm_head.weight": hf.model.embed_tokens.weight}
    plan = llama_keymap(cfg).plan(DictSource(sd), llama.abstract_params(cfg))
    assert "lm_head.weight" in plan.ignored


def test_llama_key_accounting_names_the_keys(hf_gqa):
    cfg = llama.LlamaConfig.from_hf(hf_gqa.config.to_dict())
    target = llama.abstract_params(cfg)
    sd = dict(hf_gqa.state_dict())
    km = llama_keymap(cfg)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old exports: ignored
    km.plan(DictSource(sd), target)

    extra = {**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(KeyMapError, match=r"q_norm\.weight"):
        km.plan(DictSource(extra), target)
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(KeyMapError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        km.plan(DictSource(missing), target)
    bad = {**sd, "model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)}
    with pytest.raises(KeyMapError, match=r"layer_1/attn/k_proj/kernel: expected \[64, 32\]") as e:
        km.plan(DictSource(bad), target)
    assert e.value.mismatched


def test_llama_cli_writes_loadable_folder(tmp_path, hf_gqa):
    hf_gqa.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"spm")
    cfg, params = _convert_bf16_with_cli("llama", tmp_path / "hf", tmp_path / "out")
    assert isinstance(cfg, llama.LlamaConfig) and cfg.num_kv_heads == 2
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    _, want = convert_llama(tmp_path / "hf", dtype="bfloat16")
    assert_trees_equal(params, want)
    ids = jnp.arange(6)[None]
    assert np.isfinite(np.asarray(llama.Llama(cfg).apply({"params": params}, ids))).all()


# ---------------------------------------------------------------------------------------------- owl


def _owl_checkpoint(tmp_path, version):
    """The release's layout: v1 one pytorch_model.bin, v2 sharded bins; config.json with head counts."""
    ref = make_owl_ref(version, seed=3)
    sd = dict(ref.state_dict())
    if version == 1:
        sd["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        hf = {
            "text_config": {**ref.language_model.config.to_dict()},
            "vision_config": {"num_attention_heads": 2},
            "visual_abstractor_config": {"num_attention_heads": 2},
        }
        folder = tmp_path / "owl1"
        folder.mkdir()
        torch.save(sd, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(hf))
    else:
        d, g = 32, REF_IMG // 4
        for i in range(2):  # the release saves the fixed tables as buffers
            pre = f"model.visual_abstractor.encoder.layers.{i}.crossattention.attention."
            sd[pre + "q_pos_embed"] = torch.tensor(sincos_1d(d, np.arange(6)), dtype=torch.float32)
            sd[pre + "k_pos_embed"] = torch.tensor(sincos_2d(d, g), dtype=torch.float32)
        hf = {
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "hidden_size": 32,
            "visual_config": {
                "visual_model": {"num_attention_heads": 2},
                "visual_abstractor": {"num_attention_heads": 2},
            },
        }
        folder = save_torch_shards(sd, tmp_path / "owl2", 3, config=hf)
    return ref, sd, folder


@pytest.mark.parametrize("version", [1, 2])
def test_owl_convert_round_trip(tmp_path, version):
    ref, sd, folder = _owl_checkpoint(tmp_path, version)
    cfg, params = convert_owl(folder, version)
    want_cfg = ref_owl_config(version)
    # config.json says no attention_probs_dropout_prob: the release's defaults (v1 0.1, Owl2 0) apply.
    want_abstractor = want_cfg.abstractor.replace(attention_dropout=0.1 if version == 1 else 0.0)
    assert cfg.vision == want_cfg.vision and cfg.abstractor == want_abstractor
    for f in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "rms_eps",
        "tie_embeddings",
        "modality_adaptive",
    ):
        assert getattr(cfg.llm, f) == getattr(want_cfg.llm, f), f
    assert_trees_equal(params, convert_sd(owl_keymap(cfg), ref.state_dict(), owl.abstract_params(cfg)))
    buffers = [k for k in sd if k.endswith(("inv_freq", "pos_embed"))]
    assert buffers
    _assert_export(export_owl(cfg, params), {k: v.numpy() for k, v in sd.items()}, skip=buffers)


def test_owl2_key_accounting_names_the_keys(tmp_path):
    cfg = ref_owl_config(2)
    ref = make_owl_ref(2, seed=3)
    sd = dict(ref.state_dict())
    km, target = owl_keymap(cfg), owl.abstract_params(cfg)
    drop = "model.layers.1.self_attn.v_proj.multiway.1.weight"
    with pytest.raises(KeyMapError, match=re.escape(drop)):
        km.plan(DictSource({k: v for k, v in sd.items() if k != drop}), target)
    with pytest.raises(KeyMapError, match=r"model\.visual_abstractor\.extra_head\.weight"):
        km.plan(DictSource({**sd, "model.visual_abstractor.extra_head.weight": torch.ones(2)}), target)
    # A v1 checkpoint handed to the v2 converter is refused with the key it lacks.
    _, _, folder1 = _owl_checkpoint(tmp_path, 1)
    with pytest.raises(KeyMapError, match="model.vision_model"):
        convert_owl(folder1, 2)


def test_owl2_cli_bf16(tmp_path):
    _, _, folder = _owl_checkpoint(tmp_path, 2)
    cfg, params = _convert_bf16_with_cli("mplug-owl2", folder, tmp_path / "out")
    assert isinstance(cfg, owl.OwlConfig) and cfg.version == 2
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree_util.tree_leaves(params))
    ids = jnp.asarray([[5, owl.IMAGE_TOKEN_INDEX, 6, 7]])  # the release's form: one -200, expanded inside
    logits = owl.Owl(cfg).apply({"params": params}, ids, jnp.zeros((1, REF_IMG, REF_IMG, 3)))
    assert logits.shape[1] == 3 + cfg.tokens_per_image and np.isfinite(np.asarray(logits)).all()


def test_owl2_config_fields_are_read_or_refused(tmp_path):
    """rope_scaling, the ViT's layer_norm_eps / hidden_act and the abstractor's layer_norm_eps / dropout come from
    config.json; what the model does not compute is refused, naming it."""
    _, _, folder = _owl_checkpoint(tmp_path, 2)
    hf = json.loads((folder / "config.json").read_text())

    def convert(**changes):
        cfg = json.loads(json.dumps(hf))
        for path, value in changes.items():
            node = cfg
            *parents, leaf = path.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
        (folder / "config.json").write_text(json.dumps(cfg))
        return convert_owl(folder, 2)[0]

    cfg = convert(visual_config__visual_model__layer_norm_eps=1e-5, visual_config__visual_model__hidden_act="gelu",
                  visual_config__visual_abstractor__layer_norm_eps=1e-5,
                  visual_config__visual_abstractor__attention_probs_dropout_prob=0.05,
                  rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=64)
    assert (cfg.vision.eps, cfg.vision.act) == (1e-5, "gelu")
    assert (cfg.abstractor.ffn_eps, cfg.abstractor.attention_dropout) == (1e-5, 0.05)
    assert (cfg.llm.rope_scaling, cfg.llm.rope_scaling_factor, cfg.llm.max_position_embeddings) == ("dynamic", 2.0, 64)
    with pytest.raises(ValueError, match="hidden_act='swiglu'"):
        convert(visual_config__visual_model__hidden_act="swiglu")
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        convert(rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="factor > 1"):
        convert(rope_scaling={"type": "linear", "factor": 1.0})
