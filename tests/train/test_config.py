"""Bad configs are refused before any work starts, naming the key."""

import logging
import os
import subprocess
import sys

import pytest

from aurora_jax.train.config import base_config, validate
from aurora_jax.train.recipes import blip

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("key,value,needle", [
    ("task", "segmentation", "task="),
    ("peft.method", "prefix", "peft.method="),
    ("peft.rank", 0, "peft.rank="),
    ("optim.lr", -1.0, "optim.lr="),
    ("data.name", "coco_karpathy", "data.manual_dir"),
    ("mesh", (2, 2), "mesh="),
    ("model.attention_dropout", 1.0, "model.attention_dropout="),
    ("model.drop_path", -0.1, "model.drop_path="),
    ("loss.negative_eps", -1e-4, "loss.negative_eps="),
    ("loss.label_smoothing", 1.0, "loss.label_smoothing="),
])
def test_validate_names_the_bad_key(key, value, needle):
    c = base_config()
    c.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        validate(c)


@pytest.mark.parametrize("flag,needle", [
    ("--config.optim.lrr=1e-3", "lrr"),  # unknown key
    ("--config.peft.method=prefix", "peft.method"),  # bad value
])
def test_train_cli_refuses_before_work(tmp_path, flag, needle):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--workdir", str(workdir), flag],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout
    assert not workdir.exists()  # nothing was started


def test_release_configs_set_the_release_values():
    """Each difference from the project's defaults that the release settles (README: differences, settled)."""
    from configs import coco_retrieval, demo, flickr_retrieval, pretrain_shapes, vqa
    from tests.fixtures import tiny_blip_config

    for c in (coco_retrieval.get_config(), flickr_retrieval.get_config()):
        assert (c.model.dropout, c.model.attention_dropout, c.model.drop_path) == (0.1, 0.1, 0.0)
        assert c.loss.negative_eps == 0.0 and c.eval.sim_weight == 0.0 and c.momentum.enabled
    v = vqa.get_config()
    assert (v.model.dropout, v.model.attention_dropout, v.model.drop_path) == (0.1, 0.1, 0.1)
    assert v.loss.label_smoothing == 0.0
    assert pretrain_shapes.get_config().loss.negative_eps == 1e-4  # BLIP pre-training, as the assets were made
    assert demo.get_config().eval.sim_weight == 1.0
    # The recipe puts the run's rates into the model it trains, whatever the checkpoint's config said.
    cfg = blip.RECIPE.with_compute(tiny_blip_config("vqa"), v)
    assert (cfg.text.dropout, cfg.text.attention_dropout, cfg.vision.drop_path) == (0.1, 0.1, 0.1)
    assert cfg.text.dtype == "bfloat16" and cfg.vision.remat


def _momentum_config(init: str):
    c = base_config()
    c.momentum.enabled = True
    c.momentum.queue_size = 64
    c.model.init = init
    return c


def test_momentum_without_checkpoint_copies_is_refused_unless_allowed(tmp_path, caplog):
    folder = tmp_path / "converted"
    folder.mkdir()  # a converted folder without extras/ (converted without --momentum)
    with pytest.raises(ValueError, match="--momentum.*momentum.allow_online_init"):
        validate(_momentum_config(str(folder)))
    with pytest.raises(ValueError, match="allow_online_init"):
        blip.check_momentum_copies(_momentum_config(str(folder)), None)
    allowed = _momentum_config(str(folder))
    allowed.momentum.allow_online_init = True
    with caplog.at_level(logging.WARNING, logger="aurora_jax"):
        blip.check_momentum_copies(allowed, {"queues": {}})
    assert "starts at the online weights" in caplog.text
    (folder / "extras").mkdir()
    blip.check_momentum_copies(_momentum_config(str(folder)), {"momentum": {"vision_proj": {}}})
    assert not [e for e in blip.validate(_momentum_config(str(folder))) if "momentum" in e]
    blip.check_momentum_copies(_momentum_config(""), None)  # random init: nothing to start from
