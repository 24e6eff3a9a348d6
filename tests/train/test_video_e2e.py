"""Video retrieval and video QA end to end through the engine on generated moving shapes (a few steps each)."""

import os

import numpy as np
import pytest

from aurora_jax.train.config import base_config
from aurora_jax.train.loop import train


def _video_config(task: str, data_dir: str):
    c = base_config()
    c.task = task
    c.model.size = "tiny"
    c.model.image_size = 16
    c.peft.rank = 4
    c.data.name = "moving_shapes"
    c.data.manual_dir = data_dir  # one generated set for both tasks
    c.data.num_train = 16
    c.data.num_test = 8
    c.data.image_px = 16
    c.data.max_len = 12
    c.video.frames = 2
    c.video.num_frm_train = 2
    c.video.num_frm_test = 2
    c.optim.batch_size = 8
    c.optim.epochs = 1
    c.optim.lr = 1e-3
    c.eval.at_start = False
    c.eval.batch_size = 8
    c.eval.k_test = 4
    c.checkpoint.every_steps = 2
    c.log_every = 1
    c.max_steps = 2
    c.mesh = (2, 1, 1)  # clips sharded over 2 data-parallel devices (fewer than the 8 fake ones: faster compiles)
    return c


def test_video_retrieval_trains_and_evaluates(tmp_path):
    data = str(tmp_path / "moving_shapes")
    c = _video_config("video_retrieval", data)
    c.video.frame_aware_attention = True  # momentum distillation: tests/tasks/test_video.py
    results = train(c, str(tmp_path / "retrieval"), progress=False)
    assert results["steps"] == 2
    after = results["after"]
    for key in ("txt_r1", "vid_r1", "r_mean", "vid_mdR", "itc_r_mean"):
        assert np.isfinite(after[key]), key
    assert 0.0 <= after["vid_r1"] <= 100.0 and 1.0 <= after["vid_mdR"] <= 8.0
    assert after["num_corrupt_clips"] == 0.0
    assert os.listdir(tmp_path / "retrieval" / "checkpoints")


def test_video_qa_trains_and_evaluates(tmp_path):
    q = _video_config("video_qa", str(tmp_path / "moving_shapes"))
    q.data.max_answers = 1
    q.eval.vqa_mode = "generate"
    results = train(q, str(tmp_path / "qa"), progress=False)
    after = results["after"]
    assert results["steps"] == 2 and os.listdir(tmp_path / "qa" / "checkpoints")
    assert after["num_questions"] == 8 * 3  # three questions per test clip
    for key in ("vqa_acc", "color_acc", "shape_acc", "direction_acc"):
        assert 0.0 <= after[key] <= 100.0, key


def test_video_configs_hold_the_release_values():
    """configs/{msrvtt,didemo}_retrieval.py, msrvtt_qa.py: the release yamls' values; all validate."""
    from aurora_jax.train.config import validate
    from aurora_jax.train.recipes import blip
    from configs import demo_video, demo_video_qa, didemo_retrieval, msrvtt_qa, msrvtt_retrieval

    m, d, q = msrvtt_retrieval.get_config(), didemo_retrieval.get_config(), msrvtt_qa.get_config()
    for c in (m, d):
        assert (c.task, c.peft.rank, c.model.image_size, c.optim.lr, c.optim.epochs, c.optim.batch_size) == (
            "video_retrieval", 64, 224, 1e-4, 5, 64)
        assert (c.eval.k_test, c.eval.sim_weight, c.video.num_frm_train, c.video.num_frm_test) == (128, 1.0, 8, 8)
        assert c.video.frame_aware_attention and not c.video.frame_aware_eval and c.momentum.enabled
        assert c.loss.negative_all_rank and c.momentum.queue_size == 57600 and c.data.max_words == 40
    assert (d.video.strategy_train, d.video.resize) == ("clip", "center_crop")
    assert (q.task, q.optim.lr, q.optim.epochs, q.optim.batch_size, q.eval.vqa_mode) == (
        "video_qa", 2e-5, 5, 96, "generate")
    for c in (m, d, q):
        c.data.manual_dir = "/data"
        c.optim.batch_size = c.eval.batch_size = 8  # divisible by the 8 test devices
        validate(c)
    for c in (demo_video.get_config(), demo_video_qa.get_config()):
        validate(c)
    layout = blip.RECIPE.batch_layout(m, None)
    assert layout["video"].shape == (8, 8, 224, 224, 3) and "image" not in layout
    assert blip.RECIPE.batch_layout(q, None)["answer_ids"].shape == (8, 1, 10)
    bad = msrvtt_qa.get_config()
    bad.data.name = "msrvtt_retrieval"
    bad.video.strategy_test = "middle"
    with pytest.raises(ValueError, match="video set for task") as e:
        validate(bad)
    assert "video.strategy_test='middle'" in str(e.value)
