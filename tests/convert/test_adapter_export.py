"""`--format aurora`: an Aurora adapter (+ the base leaves trained with it) saved alone and applied to a base.

save -> load gives the identical adapter tree, PeftConfig and trained leaves; applied to the untrained base
(unmerged, or merged) it gives identical tuned outputs; mismatched bases and non-Aurora runs are refused.
"""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from flax import traverse_util

from aurora_jax.convert.store import save_converted
from aurora_jax.models.blip import Blip
from aurora_jax.models.owl import Owl
from aurora_jax.peft import PeftConfig, init_adapter, merge, tuned_apply
from aurora_jax.peft.store import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    apply_adapter,
    load_adapter,
    load_tuned,
    trained_base_leaves,
)
from aurora_jax.train.export import export_merged
from aurora_jax.train.recipes.blip import RECIPE as BLIP
from aurora_jax.train.recipes.owl import RECIPE as OWL
from tests.fixtures import (
    assert_trees_equal,
    blip_inputs,
    fast_init,
    params_for,
    prompts,
    randomize,
    tiny_blip_config,
    tiny_owl,
    trained_adapter,
)

NO_TOKENIZER = types.SimpleNamespace(save_pretrained=lambda dst: None)


def train_heads(base: dict, peft_cfg: PeftConfig, seed: int = 0) -> dict:
    """The base with the leaves `peft_cfg` trains moved (as training would)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(base)
    heads = traverse_util.flatten_dict(trained_base_leaves(base, peft_cfg))
    assert heads, "the test needs trained base leaves"
    flat.update({k: np.asarray(v) + rng.normal(size=np.shape(v)).astype(np.float32) for k, v in heads.items()})
    return traverse_util.unflatten_dict(flat)


def blip_case():
    cfg = tiny_blip_config("retrieval")
    pc = PeftConfig(rank=4)  # Aurora + GQT; BLIP's heads (vision_proj, itm_head) train with it
    frozen = fast_init(cfg, 0)
    adapter = trained_adapter(init_adapter(frozen, pc, jax.random.key(1)), 1)
    pixels, ids, mask = blip_inputs()
    outputs = lambda p, a: tuned_apply(Blip(cfg), p, a, pc, pixels, ids, mask, method=Blip.itm)  # noqa: E731
    return BLIP, cfg, pc, frozen, adapter, outputs


def owl_case():
    cfg = tiny_owl(2)
    pc = PeftConfig(method="aurora", rank=4, sites="^llm/", gqt=False, ice=False, train_heads=("abstractor",))
    frozen = jax.tree_util.tree_map(np.asarray, params_for(cfg, 0))
    adapter = randomize(init_adapter(frozen, pc, jax.random.key(1)), 1, std=0.1)
    x = prompts(2)
    outputs = jax.jit(lambda p, a: tuned_apply(Owl(cfg), p, a, pc, x["input_ids"], x["pixels"],  # noqa: E731
                                               x["attention_mask"]))
    return OWL, cfg, pc, frozen, adapter, outputs


@pytest.fixture(params=["blip", "owl2"])
def case(request):
    return (blip_case if request.param == "blip" else owl_case)()


def test_save_load_apply_gives_identical_adapter_and_outputs(tmp_path, case):
    recipe, cfg, pc, frozen, adapter, outputs = case
    trained = train_heads(frozen, pc)
    export_merged(recipe, cfg, trained, adapter, pc, NO_TOKENIZER, str(tmp_path / "adapter"), fmt="aurora")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}

    saved = load_adapter(tmp_path / "adapter")
    assert saved.peft_cfg == pc
    assert_trees_equal(saved.adapter, adapter)
    assert_trees_equal(saved.base_leaves, trained_base_leaves(trained, pc))
    params, loaded = apply_adapter(saved, frozen)
    assert_trees_equal(params, trained)
    np.testing.assert_array_equal(np.asarray(outputs(params, loaded)), np.asarray(outputs(trained, adapter)))

    # The same through a converted base checkpoint on disk, unmerged and merged.
    save_converted(tmp_path / "base", cfg, frozen)
    tuned = load_tuned(tmp_path / "adapter", tmp_path / "base")
    assert_trees_equal(tuned.params, trained)
    assert_trees_equal(tuned.adapter, adapter)
    merged = load_tuned(tmp_path / "adapter", tmp_path / "base", merged=True)
    want, rest = merge(trained, adapter, pc)
    assert_trees_equal(merged.params, want)
    assert_trees_equal(merged.adapter, rest)
    assert bool(rest) == (recipe is BLIP)  # BLIP's GQT cannot be folded in


def test_the_adapter_refuses_another_base(tmp_path):
    _, cfg, pc, frozen, adapter, _ = owl_case()
    export_merged(OWL, cfg, frozen, adapter, pc, NO_TOKENIZER, str(tmp_path / "adapter"), fmt="aurora")
    saved = load_adapter(tmp_path / "adapter")
    other = tiny_owl(1)  # no GQA, no modality copies
    with pytest.raises(ValueError, match="does not fit") as e:
        apply_adapter(saved, params_for(other))
    assert "adapter leaf factors/llm/layer_0/attn/k_proj/text has no site in this base model" in str(e.value)
    # Same shapes, another model: the recorded config tells them apart.
    save_converted(tmp_path / "base", cfg.replace(llm=cfg.llm.replace(rope_theta=5e5)), frozen)
    with pytest.raises(ValueError, match="llm.rope_theta: trained on 10000.0, the base has 500000.0"):
        load_tuned(tmp_path / "adapter", tmp_path / "base")


@pytest.mark.parametrize("method, hint", [("lora", "--format peft"), ("full", "--format converted")])
def test_aurora_format_refuses_other_methods(tmp_path, method, hint):
    cfg = tiny_owl(2)
    pc = PeftConfig(method=method, lora_targets=("q_proj",), gqt=False, ice=False, train_heads=())
    base = params_for(cfg)
    with pytest.raises(ValueError, match=f"peft.method='{method}'") as e:
        export_merged(OWL, cfg, base, init_adapter(base, pc, jax.random.key(0)), pc, NO_TOKENIZER, str(tmp_path),
                      fmt="aurora")
    assert hint in str(e.value)
