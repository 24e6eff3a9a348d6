"""Parameter counts of the adapter trees on the full BLIP-base shapes (abstract: nothing is allocated)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from aurora_jax.models.blip import BlipConfig, abstract_params
from aurora_jax.models.vit import ViTConfig
from aurora_jax.peft import PeftConfig, count_params, init_adapter, partition, print_trainable_parameters

SETTINGS = {  # name: (task, image size, rank)
    "retrieval": ("retrieval", 384, 32),
    "vqa": ("vqa", 384, 32),
    "video_retrieval": ("retrieval", 224, 64),
}


@pytest.fixture(scope="module")
def base_shapes():
    return {name: abstract_params(BlipConfig(task=task, vision=ViTConfig(image_size=size)))
            for name, (task, size, _) in SETTINGS.items()}


def abstract_adapter(base, cfg: PeftConfig):
    return jax.eval_shape(lambda k: init_adapter(base, cfg, k), jax.random.key(0))


@pytest.mark.parametrize("name,core,want", [
    ("retrieval", "dense", 125_696),
    ("vqa", "dense", 164_864),
    ("video_retrieval", "dense", 411_136),
    # strict CP: the R^3 core becomes R weights
    ("retrieval", "diagonal", 125_696 - 32**3 + 32),
    ("vqa", "diagonal", 164_864 - 32**3 + 32),
    ("video_retrieval", "diagonal", 411_136 - 64**3 + 64),
])
def test_aurora_counts(base_shapes, name, core, want):
    rank = SETTINGS[name][2]
    adapter = abstract_adapter(base_shapes[name], PeftConfig(rank=rank, core=core))
    assert count_params(adapter) == want
    # the spec's breakdown: shared U+V+C once, R x 12 per ViT block, 6R + 4*768 per BERT layer
    d, n_text = 768, 24 if name == "vqa" else 12
    assert count_params(adapter["shared"]) == 2 * d * rank + (rank**3 if core == "dense" else rank)
    assert count_params(adapter["factors"]["visual_encoder"]) == 12 * rank * 12
    text = {k: v for k, v in adapter["factors"].items() if k != "visual_encoder"}
    assert count_params(text) + count_params(adapter["gqt"]) == n_text * (6 * rank + 4 * d)


def test_retrieval_trainable_summary(base_shapes, capsys):
    base = base_shapes["retrieval"]
    cfg = PeftConfig(rank=32)
    trainable, frozen = partition(base, abstract_adapter(base, cfg), cfg)
    heads = (768 * 256 + 256) + (768 * 2 + 2)  # vision_proj + itm_head; text_proj frozen (release)
    total = count_params(base) + 125_696
    line = print_trainable_parameters(trainable, frozen)
    assert count_params(trainable) == 125_696 + heads
    assert f"trainable params: {125_696 + heads:,} || all params: {total:,}" in line
    assert line in capsys.readouterr().out
    with_text_proj = cfg.replace(train_heads=("vision_proj", "itm_head", "text_proj"))
    trainable, _ = partition(base, abstract_adapter(base, with_text_proj), with_text_proj)
    assert count_params(trainable) == 125_696 + heads + 768 * 256 + 256


def test_lora_and_baseline_counts(base_shapes):
    base = base_shapes["retrieval"]
    lora = PeftConfig(method="lora", lora_r=8)  # default targets: query|value|qkv
    n = count_params(abstract_adapter(base, lora))
    vit_qkv = 12 * 8 * (768 + 3 * 768)
    bert_qv = 12 * 2 * 2 * 8 * (768 + 768)  # query, value in self- and cross-attention
    assert n == vit_qkv + bert_qv
    heads = count_params(base["vision_proj"]) + count_params(base["itm_head"])
    for method, want in (("frozen", heads), ("full", count_params(base) - 1)):  # full: all but temp
        cfg = PeftConfig(method=method)
        adapter = abstract_adapter(base, cfg)
        assert adapter == {}
        trainable, _ = partition(base, adapter, cfg)
        assert count_params(trainable) == want


def test_release_inits(base_shapes):
    """Materialise the retrieval adapter (init_adapter only reads base shapes) and check each init law."""
    base = base_shapes["retrieval"]
    a = init_adapter(base, PeftConfig(rank=32), jax.random.key(0))
    within = lambda x, bound: bound * 0.95 < float(np.max(np.abs(x))) <= bound  # noqa: E731
    assert not np.any(np.asarray(a["shared"]["V"]))
    assert within(a["shared"]["U"], 1 / math.sqrt(768))
    assert within(a["shared"]["C"], math.sqrt(3) / 32)
    attn, mlp = a["factors"]["visual_encoder"]["layer_0"]["attn"], a["factors"]["visual_encoder"]["layer_0"]["mlp"]
    assert attn.shape == (32, 4) and within(attn, math.sqrt(6 / 36))
    assert mlp.shape == (32, 8) and within(mlp, math.sqrt(6 / 40))
    q = a["factors"]["text_encoder"]["layer_0"]["cross_attn"]["query"]
    assert q.shape == (32, 1) and float(np.max(np.abs(q))) <= math.sqrt(6 / 33)
    gqt = np.concatenate([np.asarray(x) for x in jax.tree_util.tree_leaves(a["gqt"])])
    assert gqt.size == 12 * 4 * 768 and abs(gqt.std() / 2e-4 - 1) < 0.03 and abs(gqt.mean()) < 1e-5
    lora = init_adapter(base, PeftConfig(method="lora", lora_r=8), jax.random.key(0))["lora"]
    qkv = lora["visual_encoder"]["layer_0"]["attn"]["qkv"]
    assert qkv["A"].shape == (768, 8) and within(qkv["A"], 1 / math.sqrt(768))
    assert qkv["B"].shape == (8, 2304) and not np.any(np.asarray(qkv["B"]))


def test_video_retrieval_trainable(base_shapes):
    """Video retrieval (224 px, R = 64): 411,136 adapter parameters, 609,538 with vision_proj and itm_head."""
    base = base_shapes["video_retrieval"]
    cfg = PeftConfig(rank=64)
    adapter = abstract_adapter(base, cfg)
    trainable, _ = partition(base, adapter, cfg)
    assert count_params(adapter) == 411_136
    assert count_params(trainable) == 609_538 == 411_136 + (768 * 256 + 256) + (768 * 2 + 2)
