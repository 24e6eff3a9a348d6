"""Bad configs are refused before any work starts, naming the key."""

import os
import subprocess
import sys

import pytest

from aurora_jax.train.config import base_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("key,value,needle", [
    ("task", "segmentation", "task="),
    ("peft.method", "prefix", "peft.method="),
    ("peft.rank", 0, "peft.rank="),
    ("optim.lr", -1.0, "optim.lr="),
    ("data.name", "coco_karpathy", "data.manual_dir"),
    ("mesh", (2, 2), "mesh="),
])
def test_validate_names_the_bad_key(key, value, needle):
    c = base_config()
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
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
