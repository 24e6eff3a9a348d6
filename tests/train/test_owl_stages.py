"""Stage partitions (what trains in each stage), config validation and the CLI's refusal of unknown keys."""

from __future__ import annotations

import os

import jax
import pytest
from absl import flags
from flax import traverse_util
from ml_collections import config_flags

from aurora_jax.models.owl import abstract_params
from aurora_jax.peft import init_adapter, partition
from aurora_jax.train.config import base_config, validate
from aurora_jax.train.recipes.owl import stage_peft_config
from tests.fixtures import tiny_owl

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "owl_tiny_shapes.py")


def _split(stage: str, **peft):
    c = base_config("owl")
    c.stage = stage
    c.peft.rank = 4
    for k, v in peft.items():
        c.peft[k] = v
    cfg = stage_peft_config(c)
    base = abstract_params(tiny_owl(2))
    adapter = jax.eval_shape(lambda k: init_adapter(base, cfg, k), jax.random.key(0))
    trainable, frozen = partition(base, adapter, cfg)
    flat_base = traverse_util.flatten_dict(base)
    train_paths = set(traverse_util.flatten_dict(trainable["base"])) if trainable["base"] else set()
    frozen_paths = set(traverse_util.flatten_dict(frozen)) if frozen else set()
    assert train_paths | frozen_paths == set(flat_base) and not train_paths & frozen_paths
    return trainable, train_paths, flat_base


@pytest.mark.parametrize("stage,parts", [
    ("pretrain", {"vision", "abstractor"}),  # v1 stage 1: LLM frozen
    ("finetune", {"abstractor", "llm"}),  # v2 fine-tuning: vision frozen
    ("full", {"vision", "abstractor", "llm"}),
])
def test_base_training_stages(stage, parts):
    trainable, train_paths, flat_base = _split(stage)
    assert trainable["adapter"] == {}
    assert train_paths == {p for p in flat_base if p[0] in parts}


def test_instruct_lora_trains_exactly_the_adapter():
    """v1 stage 2: LoRA on q_proj / v_proj (both modality copies of v in Owl2), nothing of the base."""
    trainable, train_paths, _ = _split("instruct", method="lora")
    assert train_paths == set()
    sites = {p[:-1] for p in traverse_util.flatten_dict(trainable["adapter"]["lora"])}
    assert sites == {("llm", f"layer_{i}", "attn", *n) for i in range(2)
                     for n in (("q_proj",), ("v_proj", "text"), ("v_proj", "image"))}


def test_instruct_aurora_trains_exactly_the_adapter():
    trainable, train_paths, _ = _split("instruct", method="aurora")
    assert train_paths == set()
    adapter = trainable["adapter"]
    assert set(adapter) == {"shared", "factors"}  # no GQT: Owl has no cross-attention BERT layers
    factor_paths = set(traverse_util.flatten_dict(adapter["factors"]))
    assert {p[0] for p in factor_paths} == {"llm"} and {p[2] for p in factor_paths} == {"attn"}


def test_extra_train_heads_join_a_stage():
    """e.g. v2 LoRA while the abstractor trains too."""
    _, train_paths, flat_base = _split("instruct", method="lora", train_heads=("abstractor",))
    assert train_paths == {p for p in flat_base if p[0] == "abstractor"}


@pytest.mark.parametrize("key,value,needle", [
    ("stage", "stage3", "stage="),
    ("peft.method", "full", "peft.method="),
    ("optim.lr", -1.0, "optim.lr="),
    ("optim.schedule", "linear", "optim.schedule="),
    ("peft.lora_dropout", 1.5, "lora_dropout"),
    ("peft.sites", "(", "peft"),
    ("model.heads", 3, "model.width="),
    ("sharding_rules", (("embed", "model"),), "sharding_rules"),
    ("data.name", "coco", "data.name="),
])
def test_validate_names_the_bad_key(key, value, needle):
    c = base_config("owl")
    c.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match="bad config") as e:
        validate(c)
    assert needle in str(e.value)


@pytest.mark.parametrize("module,arg", [("owl_v1_lora", None), ("owl2_lora", "lora"), ("owl2_lora", "aurora"),
                                        ("owl2_lora", "full")])
def test_release_configs_only_miss_the_users_paths(module, arg):
    import importlib

    c = importlib.import_module(f"configs.{module}").get_config(arg)
    with pytest.raises(ValueError) as e:
        validate(c)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 2 and "data.manual_dir" in lines[0] and "model.init" in lines[1]


def test_config_file_variants_validate_and_unknown_keys_are_refused():
    from configs.owl_tiny_shapes import VARIANTS, get_config

    for v in VARIANTS:
        validate(get_config(v))

    def parse(*args):
        argv = ["prog", *args]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
        fv(argv)
        return fv.config

    c = parse(f"--config={CONFIG_FILE}:aurora", "--config.optim.lr=0.01")
    assert c.optim.lr == 0.01 and c.peft.method == "aurora"
    with pytest.raises(Exception, match="learning_rate"):
        parse(f"--config={CONFIG_FILE}", "--config.optim.learning_rate=0.01")
