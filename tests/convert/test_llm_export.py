"""LLM-side export to PyTorch: LLaMA / mPLUG-Owl HF folders and LoRA adapters as HF PEFT folders.

- `hf`: transformers' LlamaForCausalLM loaded from our LLaMA folder gives our logits; an Owl folder (release
  layout) converts back through our own converter to identical config and parameters (v1 and v2);
- `peft`: `peft.PeftModel.from_pretrained` on the HF model gives our adapter-applied logits (LLaMA, and the
  torch reference Owls: v1's LlamaForCausalLM language model, Owl2's multiway LLM);
- refusals name what a format would lose.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from aurora_jax.convert.hf_export import llama_hf_problems, save_llama_hf, save_owl_hf
from aurora_jax.convert.llama import llama_keymap
from aurora_jax.convert.owl import convert_owl, owl_keymap
from aurora_jax.convert.peft_export import (
    lora_pairs,
    owl_peft_modules,
    peft_state,
    save_llama_peft,
    save_owl_peft,
    target_modules,
)
from aurora_jax.models import owl
from aurora_jax.models.llama import Llama, LlamaConfig, abstract_params
from aurora_jax.peft import PeftConfig, init_adapter, merge, tuned_apply
from aurora_jax.tasks import instruct
from aurora_jax.train.export import export_merged
from aurora_jax.train.recipes.owl import RECIPE as OWL
from tests.fixtures import (
    REF_IMG,
    REF_K,
    assert_trees_equal,
    convert_sd,
    make_hf_llama,
    make_owl_ref,
    max_rel_err,
    params_for,
    randomize,
    ref_owl_config,
    tiny_owl,
)

TOL = 1e-5  # max |ours - torch| / max |torch|, float32


class NoTokenizer:
    """export_merged saves the run's tokenizer next to the weights; these tests have none."""

    def save_pretrained(self, dst):
        pass


def lora_cfg(targets=("q_proj", "v_proj"), **kw) -> PeftConfig:
    return PeftConfig(**{"method": "lora", "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05,
                         "lora_targets": targets, "train_heads": (), "gqt": False, "ice": False, **kw})


AURORA_LLM = PeftConfig(method="aurora", rank=4, sites="^llm/", gqt=False, ice=False, train_heads=())


def lora_adapter(params: dict, cfg: PeftConfig, seed: int = 0) -> dict:
    """A trained-looking LoRA: A and B random (B is zero at init)."""
    return randomize(init_adapter(params, cfg, jax.random.key(seed)), seed, std=0.1)


def llama_from_hf(model) -> tuple[LlamaConfig, dict]:
    cfg = LlamaConfig.from_hf(model.config.to_dict())
    return cfg, convert_sd(llama_keymap(cfg), model.state_dict(), abstract_params(cfg))


def torch_logits(model, *args) -> np.ndarray:
    with torch.no_grad():
        out = model(*args)
    return (out.logits if hasattr(out, "logits") else out).float().numpy()


IDS = np.random.RandomState(0).randint(3, 128, (2, 13))


# --------------------------------------------------------------------------------------------- LLaMA


@pytest.mark.parametrize(
    "overrides, shard_bytes",
    [({}, None), (dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0), 40_000)],
    ids=["mha_single_file", "gqa_tied_theta_sharded"],
)
def test_llama_hf_folder_loads_in_transformers(tmp_path, overrides, shard_bytes):
    """Merged LoRA weights -> our HF folder -> LlamaForCausalLM.from_pretrained: the same logits."""
    cfg, params = llama_from_hf(make_hf_llama(4, **overrides))
    pc = lora_cfg(("q_proj", "k_proj", "up_proj"))
    merged, _ = merge(params, lora_adapter(params, pc), pc)
    merged = jax.tree_util.tree_map(np.asarray, merged)
    save_llama_hf(tmp_path, cfg, merged, **({} if shard_bytes is None else {"max_shard_bytes": shard_bytes}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard_bytes is not None)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).float().eval()
    ours = Llama(cfg).apply({"params": merged}, jnp.asarray(IDS))
    err = max_rel_err(ours, torch_logits(hf, torch.tensor(IDS)))
    print(f"LLaMA hf export ({'/'.join(overrides) or 'mha'}) logits max rel err: {err:.2e}")
    assert err < TOL


def test_llama_hf_refuses_the_modality_adaptive_llm():
    problems = llama_hf_problems(tiny_owl(2).llm)
    assert len(problems) == 1 and "image copies" in problems[0]
    with pytest.raises(ValueError, match="modality_adaptive"):
        save_llama_hf("/nonexistent", tiny_owl(2).llm, {})


def test_llama_peft_adapter_loads_with_peft(tmp_path, hf_llama):
    """LoRA on q/v and the MLP's down_proj -> PEFT folder -> PeftModel on a LlamaForCausalLM: our logits."""
    cfg, params = llama_from_hf(hf_llama)
    pc = lora_cfg(("q_proj", "v_proj", "down_proj"))
    adapter = lora_adapter(params, pc, 1)
    save_llama_peft(tmp_path, cfg, adapter, pc)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8, 0.05)
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 3 * cfg.num_layers
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, cfg.hidden_size) and b.shape == (cfg.hidden_size, 4)
    np.testing.assert_array_equal(a, np.asarray(adapter["lora"]["layer_1"]["attn"]["q_proj"]["A"]).T)

    model = peft.PeftModel.from_pretrained(make_hf_llama(0), tmp_path).eval()  # a fresh copy of hf_llama
    assert model.peft_config["default"].lora_alpha / model.peft_config["default"].r == pc.lora_scale
    ours = tuned_apply(Llama(cfg), params, adapter, pc, jnp.asarray(IDS))
    assert max_rel_err(ours, torch_logits(hf_llama, torch.tensor(IDS))) > 0.01  # the adapter matters
    err = max_rel_err(ours, torch_logits(model, torch.tensor(IDS)))
    print(f"LLaMA LoRA via transformers+peft logits max rel err: {err:.2e}")
    assert err < TOL


def test_target_modules_short_names_only_when_they_select_exactly_the_sites():
    every = [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    assert target_modules(every[::2], every) == ["q_proj"]
    assert target_modules(every[:1], every) == ["model.layers.0.self_attn.q_proj"]  # layer 1 left alone
    mw = [f"model.layers.0.self_attn.v_proj.multiway.{i}" for i in range(2)]
    assert target_modules(mw, mw + every) == ["v_proj.multiway.0", "v_proj.multiway.1"]


# ------------------------------------------------------------------------------------------- Owl: hf


@pytest.mark.parametrize("version", [1, 2], ids=["owl1", "owl2"])
def test_owl_hf_export_converts_back_identically(tmp_path, version):
    """export_merged(..., fmt="hf") on an Owl run's adapter -> convert_owl: the same config and merged params."""
    cfg = tiny_owl(version)
    base = params_for(cfg, version)
    if version == 1:
        pc = lora_cfg()
    else:  # Aurora on every LLM linear, GQA k/v copies and the non-square MLP included
        pc = AURORA_LLM
    adapter = randomize(init_adapter(base, pc, jax.random.key(1)), 2, std=0.1)
    dst = tmp_path / "hf"
    export_merged(OWL, cfg, base, adapter, pc, NoTokenizer(), str(dst), fmt="hf")
    hf = json.loads((dst / "config.json").read_text())
    assert hf["architectures"] == [("MplugOwlForConditionalGeneration", "MPLUGOwl2LlamaForCausalLM")[version - 1]]
    back_cfg, back = convert_owl(dst, version)
    assert owl.with_compute(back_cfg, "float32") == owl.with_compute(cfg, "float32")
    merged, _ = merge(base, adapter, pc)
    assert_trees_equal(back, jax.tree_util.tree_map(np.asarray, merged))


def test_owl2_hf_export_in_shards(tmp_path):
    cfg = tiny_owl(2)
    params = jax.tree_util.tree_map(np.asarray, params_for(cfg, 3))
    save_owl_hf(tmp_path, cfg, params, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(owl_keymap(cfg).export(params))
    back_cfg, back = convert_owl(tmp_path, 2)
    assert back_cfg == cfg
    assert_trees_equal(back, params)


@pytest.mark.parametrize(
    "change, lost",
    [
        (lambda c: c.replace(llm=c.llm.replace(num_kv_heads=2)), "num_kv_heads=2 (grouped-query attention)"),
        (lambda c: c.replace(llm=c.llm.replace(rope_theta=5e5)), "rope_theta=500000.0"),
        (lambda c: c.replace(abstractor=c.abstractor.replace(norm_eps=1e-6)), "abstractor.norm_eps=1e-06"),
    ],
    ids=["gqa", "rope_theta", "abstractor_eps"],
)
def test_owl1_hf_refuses_what_the_release_cannot_hold(tmp_path, change, lost):
    cfg = change(tiny_owl(1))
    with pytest.raises(ValueError, match="cannot hold") as e:
        save_owl_hf(tmp_path, cfg, params_for(cfg))
    assert lost in str(e.value)
    assert not (tmp_path / "config.json").exists()


# ----------------------------------------------------------------------------------------- Owl: peft


def owl_inputs(version: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Two samples with one image each (REF_K placeholder tokens) between text runs, and their pixels."""
    rng = np.random.RandomState(5)
    ph = instruct.IMAGE_PLACEHOLDER_ID[version]
    ids = np.stack([np.concatenate([rng.randint(3, vocab, n), [ph] * REF_K, rng.randint(3, vocab, 9 - n)])
                    for n in (2, 5)]).astype(np.int64)
    return ids, rng.randn(2, REF_IMG, REF_IMG, 3).astype(np.float32)


@pytest.mark.parametrize("version", [1, 2], ids=["owl1", "owl2"])
def test_owl_peft_adapter_on_the_torch_reference(tmp_path, version):
    """Owl run's LoRA -> `--format peft` -> PeftModel on the reference's LLM: the full Owl's logits match.

    v1: PeftModel wraps the language model (a transformers LlamaForCausalLM); v2: the whole release-layout
    model, with LoRA on both multiway copies of v_proj.
    """
    ref, cfg = make_owl_ref(version), ref_owl_config(version)
    params = convert_sd(owl_keymap(cfg), ref.state_dict(), owl.abstract_params(cfg))
    pc = lora_cfg()
    adapter = lora_adapter(params, pc, 3)
    OWL.export("peft", str(tmp_path), cfg, None, {}, adapter=adapter, peft_cfg=pc, base=params)

    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert targets == (["q_proj", "v_proj"] if version == 1 else ["q_proj", "v_proj.multiway.0", "v_proj.multiway.1"])
    ids, pixels = owl_inputs(version, cfg.llm.vocab_size)
    torch_inputs = (torch.tensor(ids), torch.tensor(pixels).permute(0, 3, 1, 2))
    before = torch_logits(ref, *torch_inputs)
    if version == 2:  # the release's model is a PreTrainedModel; PeftModelForCausalLM keeps this method of it
        ref.prepare_inputs_for_generation = None
    peft.PeftModel.from_pretrained(ref.language_model if version == 1 else ref, tmp_path)  # LoRA goes in in place
    ours = jax.jit(lambda p, a: tuned_apply(owl.Owl(cfg), p, a, pc, ids, pixels))(params, adapter)
    assert max_rel_err(ours, before) > 0.01  # the adapter matters
    err = max_rel_err(ours, torch_logits(ref.eval(), *torch_inputs))
    print(f"mPLUG-Owl{'' if version == 1 else '2'} LoRA via peft logits max rel err: {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize(
    "peft_cfg, lost",
    [
        (AURORA_LLM, "mode-approximation"),
        (lora_cfg(train_heads=("abstractor",)), "train_heads=['abstractor']"),
        (lora_cfg(r"q_proj|qkv"), "vision/layer_0/attn/qkv"),
        (PeftConfig(method="frozen", train_heads=("abstractor",), gqt=False, ice=False), "trains base weights"),
    ],
    ids=["aurora", "trained_heads", "vision_lora", "frozen_stage"],
)
def test_owl_peft_refusals_name_what_would_be_lost(tmp_path, peft_cfg, lost):
    cfg = tiny_owl(2)
    base = params_for(cfg)
    adapter = init_adapter(base, peft_cfg, jax.random.key(0))
    with pytest.raises(ValueError) as e:
        export_merged(OWL, cfg, base, adapter, peft_cfg, NoTokenizer(), str(tmp_path), fmt="peft")
    assert lost in str(e.value)
    assert not (tmp_path / "adapter_config.json").exists()


def test_owl_peft_module_names_follow_the_release_layout():
    """Every PEFT module name is a Linear of the release's state dict (v2: multiway copies by index)."""
    cfg = tiny_owl(2)
    params = params_for(cfg)
    pc = lora_cfg(("q_proj", "k_proj", "gate_proj"))
    release_keys = owl_keymap(cfg).export(jax.tree_util.tree_map(np.asarray, params))
    state = peft_state(lora_pairs(init_adapter(params, pc, jax.random.key(0))), owl_peft_modules(cfg))
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in state}
    assert len(modules) == 4 * cfg.llm.num_layers  # q, k text, k image, gate
    assert "model.layers.1.self_attn.k_proj.multiway.1" in modules
    assert all(f"{m}.weight" in release_keys for m in modules)


def test_export_merged_refuses_unknown_formats(tmp_path):
    cfg = tiny_owl(2)
    with pytest.raises(ValueError, match="exports converted, hf, peft, aurora; not 'onnx'"):
        export_merged(OWL, cfg, {}, {}, lora_cfg(), NoTokenizer(), str(tmp_path), fmt="onnx")


def test_save_owl_peft_refuses_an_empty_adapter(tmp_path):
    with pytest.raises(ValueError, match="empty LoRA adapter"):
        save_owl_peft(tmp_path, tiny_owl(1), {}, lora_cfg())
