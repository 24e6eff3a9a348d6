"""The instruction trainer on a very small version of configs/owl_tiny_shapes.py: loss, resume, export, chat."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from aurora_jax import chat
from aurora_jax.train import loop
from aurora_jax.train.metrics_log import read_metrics
from configs.owl_tiny_shapes import get_config


def tiny_config(variant: str = "lora"):
    """configs/owl_tiny_shapes.py shrunk: 1-layer parts, 16 images, batch 8 (the 8 fake devices' mesh)."""
    c = get_config(variant)
    m = c.model
    m.image_size, m.patch_size, m.vision_width, m.vision_layers = 16, 8, 16, 1
    m.abstractor_layers, m.num_queries, m.width, m.layers, m.heads, m.kv_heads = 1, 4, 32, 1, 4, 2
    c.data.num_train, c.data.num_test, c.data.image_px, c.data.max_len = 16, 4, 32, 72
    c.optim.batch_size, c.optim.lr, c.optim.warmup_steps, c.optim.epochs = 8, 1e-2, 0, 10
    c.eval.batch_size, c.eval.max_questions, c.eval.max_new_tokens = 8, 8, 2
    c.checkpoint.every_steps, c.checkpoint.keep = 3, 5
    c.log_every, c.max_steps = 1, 6
    return c


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("owl_lora"))
    results = loop.train(tiny_config("lora"), workdir, progress=False)
    return workdir, results


def test_training_lowers_the_loss(lora_run):
    workdir, results = lora_run
    train = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    losses = [r["loss"] for r in train]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert results["after"]["loss"] < results["before"]["loss"]
    assert 0.0 <= results["after"]["answer_acc"] <= 1.0
    assert results["summary"]["trainable"] < results["summary"]["total"] / 10  # only the LoRA pairs
    for name in ("results.json", "config.json", "curves.png", "export/aurora_config.json", "base/aurora_config.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))


def test_resume_from_a_checkpoint_gives_identical_params(lora_run, tmp_path):
    """Steps 4-6 after restoring step 3 (params, optimizer, rng, data iterator) == the uninterrupted run."""
    workdir, results = lora_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns("export", "results.json", "metrics.jsonl"))
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    c = tiny_config("lora")
    c.eval.max_questions, c.export = 0, False
    again = loop.train(c, resumed, progress=False)
    assert again["steps"] == 6 and "before" not in again
    want = jax.tree_util.tree_leaves(results["run"].state.trainable)
    got = jax.tree_util.tree_leaves(again["run"].state.trainable)
    assert len(want) == len(got) > 0
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    steps = [r["step"] for r in read_metrics(os.path.join(resumed, "metrics.jsonl")) if r["split"] == "train"]
    assert steps == [4, 5, 6]


def _image(workdir: str) -> str:
    with open(os.path.join(workdir, "config.json")) as f:
        seed = json.load(f)["seed"]
    folder = os.path.join(workdir, "llava_shapes", f"shapes_downstream_n16_t4_px32_s{seed}", "images", "test")
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def test_chat_cli_on_a_converted_checkpoint_and_on_a_run(lora_run, capsys):
    """`python -m aurora_jax.chat` end to end: the merged export (converted folder), and the run itself
    (base + unmerged adapter on the KV-cached path) answer the same; sampling options run too."""
    workdir, _ = lora_run
    image = _image(workdir)
    argv = ["--image", image, "--prompt", "how many shapes are there?", "--max-new-tokens", "3"]
    assert chat.main(["--ckpt", os.path.join(workdir, "export"), *argv]) == 0
    merged = capsys.readouterr().out.splitlines()
    assert chat.main(["--ckpt", workdir, *argv]) == 0
    unmerged = capsys.readouterr().out.splitlines()
    assert len(merged) == len(unmerged) == 1 and merged == unmerged
    assert chat.main(["--ckpt", workdir, *argv, "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    with pytest.raises(SystemExit, match="top_p"):
        chat.main(["--ckpt", workdir, *argv, "--top-p", "0"])


def test_bf16_remat_accumulation_on_an_fsdp_tensor_mesh(lora_run, tmp_path):
    """Aurora on a converted base restored straight into (data 2, fsdp 2, tensor 2) shards, in bf16 with
    remat and 2 accumulated micro-batches per update."""
    workdir, _ = lora_run
    c = tiny_config("aurora")
    c.model.init = os.path.join(workdir, "base")
    c.compute_dtype, c.model.remat, c.optim.grad_accum, c.mesh = "bfloat16", True, 2, (2, 2, 2)
    c.data.num_test, c.export, c.max_steps = 0, False, 2
    results = loop.train(c, str(tmp_path / "bf16"), progress=False)
    run = results["run"]
    assert results["steps"] == 2 and results["after"] == {}
    frozen = jax.tree_util.tree_leaves(run.frozen)
    assert {x.dtype for x in frozen} == {np.dtype("bfloat16")}
    assert any(len(set(x.sharding.spec) - {None}) for x in frozen)  # some leaves are split over fsdp/tensor
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(run.state.trainable))
    train = [r for r in read_metrics(str(tmp_path / "bf16" / "metrics.jsonl")) if r["split"] == "train"]
    assert len(train) == 2 and all(np.isfinite(r["loss"]) for r in train)
    assert int(run.state.opt_state.gradient_step) == 1  # two micro-batches, one update


def test_scanned_layers_train_as_unrolled(tmp_path):
    """model.scan_layers (ViT and LLaMA under nn.scan, 2 LLM layers): the same adapter after the same steps."""
    got = {}
    for scan in (False, True):
        c = tiny_config("lora")
        c.model.layers, c.model.scan_layers = 2, scan
        c.peft.lora_dropout = 0.0  # dropout draws per layer differently in the two layouts
        c.max_steps, c.eval.max_questions, c.export = 3, 0, False
        got[scan] = loop.train(c, str(tmp_path / f"scan_{scan}"), progress=False)["run"].state.trainable
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(got[False]),
                                 jax.tree_util.tree_leaves_with_path(got[True]), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
