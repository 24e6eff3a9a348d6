"""Nothing silently wrong: a diverging run, a NaN backbone, a second run on a workdir, a resume onto another
backbone, a damaged checkpoint, another mesh on resume, and a careless CLI user each get a clear error or a
correct recovery."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from aurora_jax.convert.store import load_converted, save_converted
from aurora_jax.train.checkpoint import Checkpointer
from aurora_jax.train.config import base_config, recipe_module, validate
from aurora_jax.train.loop import NonFiniteError, train
from aurora_jax.train.workdir import BaseMismatch, WorkdirBusy, WorkdirLock
from tests.fixtures import tiny_caption_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSET = os.path.join(ROOT, "aurora_jax", "assets", "blip_tiny_shapes")  # the demo's pre-trained tiny BLIP


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def short(config, steps: int):
    config.max_steps = steps
    config.eval.at_start = False
    return config


@pytest.mark.parametrize("key,value,needle", [
    ("checkpoint.keep", 0, "checkpoint.keep=0 must be >= 1"),
    ("log_every", 0, "log_every=0 must be >= 1"),
    ("eval.every_epochs", 0, "eval.every_epochs=0 must be >= 1"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps=0"),
    ("max_nonfinite_steps", 0, "max_nonfinite_steps=0"),
    ("optim.lr", float("nan"), "optim.lr=nan"),
    ("mesh", (16, 1, 1), "needs 16 devices, 8 available"),
    ("mesh", (2, 2, 3), "needs 12 devices"),
])
def test_config_rules(key, value, needle):
    c = base_config("blip")
    c.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match="bad config") as e:
        validate(c)
    assert needle in str(e.value)


def test_batch_must_divide_over_the_data_parallel_axes(tmp_path):
    c = base_config("blip")
    c.mesh, c.optim.batch_size = (8, 1, 1), 12
    with pytest.raises(ValueError, match=r"optim.batch_size=12 is not a multiple of the data-parallel size 8"):
        train(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was built
    c.mesh, c.optim.batch_size, c.eval.batch_size = (2, 2, 2), 4, 6
    with pytest.raises(ValueError, match=r"eval.batch_size=6 is not a multiple of the data-parallel size 4"):
        validate(c)


def _finite_checkpoints(workdir: str) -> list[int]:
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    steps = ckpt.all_steps()
    for step in steps:
        state, _ = ckpt.restore(step, with_data=False)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state["trainable"]))
    ckpt.close()
    return steps


def test_diverging_run_stops_with_an_error_and_saves_only_finite_states(data_dir, tmp_path):
    c = tiny_caption_config(data_dir)
    c.optim.lr = 1e6
    c.max_nonfinite_steps = 3
    c.checkpoint.every_steps = 1
    workdir = str(tmp_path / "diverged")
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        train(c, workdir, progress=False)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert sum(r.get("nonfinite_steps", 0) for r in rows) >= 3
    assert rows[-1]["nonfinite_steps"] == 1
    assert _finite_checkpoints(workdir)  # checkpoints were written, and none holds a NaN
    assert not os.path.exists(os.path.join(workdir, "results.json"))  # nothing reported from a broken model


def test_backbone_with_a_nan_is_refused_before_any_work(tmp_path):
    cfg, params = load_converted(ASSET)
    params["visual_encoder"]["layer_0"]["attn"]["qkv"]["kernel"][0, 0] = np.nan
    broken = str(tmp_path / "broken")
    save_converted(broken, cfg, params)
    shutil.copy(os.path.join(ASSET, "tokenizer.json"), broken)
    shutil.copy(os.path.join(ASSET, "tokenizer_config.json"), broken)
    c = base_config("blip")
    c.model.init, c.model.image_size = broken, 32
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(NonFiniteError, match=r"visual_encoder/layer_0/attn/qkv/kernel"):
        train(c, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_second_run_on_a_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    workdir = str(tmp_path / "busy")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom aurora_jax.train.workdir import WorkdirLock\n"
        "lock = WorkdirLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n"), workdir],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=f"pid {holder.pid}"):
            train(tiny_caption_config(str(tmp_path / "tfds")), workdir, progress=False)
        assert not os.path.exists(os.path.join(workdir, "config.json"))  # refused at once
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="aurora_jax"), WorkdirLock(workdir):  # the holder died
        pass
    assert f"left by pid {holder.pid}" in caplog.text


def _converted_base(config, folder: str, scale: float = 1.0) -> str:
    """The config's random-init backbone as a converted folder (weights times `scale`), with its tokenizer."""
    recipe = recipe_module(config.recipe)
    tok = recipe.tokenizer(config, folder)
    cfg, params = recipe.load_base(config, tok, folder)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x) * np.asarray(scale, np.asarray(x).dtype), params)
    save_converted(folder, cfg, params)
    tok.save_pretrained(folder)
    return folder


def test_resume_onto_another_backbone_is_refused(data_dir, tmp_path):
    c = tiny_caption_config(data_dir)
    c.model.init = _converted_base(c, str(tmp_path / "base"))
    other = _converted_base(c, str(tmp_path / "other_base"), scale=1.01)  # the same shapes
    workdir = str(tmp_path / "run")
    train(short(c, 1), workdir, progress=False)
    before = open(os.path.join(workdir, "config.json")).read()
    c2 = c.copy_and_resolve_references()
    c2.model.init, c2.max_steps = other, 2
    with pytest.raises(BaseMismatch, match="another backbone"):
        train(c2, workdir, progress=False)
    assert open(os.path.join(workdir, "config.json")).read() == before  # nothing was overwritten
    c2.resume.allow_new_base = True
    assert train(c2, workdir, progress=False)["steps"] == 2


def _truncate_largest_file(folder: str) -> str:
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 2)
    return target


def test_corrupt_newest_checkpoint_resumes_from_the_newest_readable(data_dir, tmp_path):
    c = tiny_caption_config(data_dir)
    workdir = str(tmp_path / "run")
    train(short(c, 4), workdir, progress=False)
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [2, 4]
    _truncate_largest_file(os.path.join(workdir, "checkpoints", "4"))
    results = train(short(c, 6), workdir, progress=False)
    assert results["steps"] == 6
    assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "4"))  # kept for inspection
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))
             if json.loads(line)["split"] == "train"]
    assert steps[-4:] == [3, 4, 5, 6]  # resumed after step 2


def test_checkpoint_restores_onto_another_mesh_and_continues_the_same(data_dir, tmp_path):
    """Saved on 8 devices, resumed on 2, then on 1: the same parameters as the uninterrupted 8-device run."""
    c = tiny_caption_config(data_dir)
    c.mesh = (8, 1, 1)
    want = train(short(c, 6), str(tmp_path / "full"), progress=False)["run"].state.trainable
    workdir = str(tmp_path / "moved")
    train(short(c, 4), workdir, progress=False)
    for devices, steps in ((2, 5), (1, 6)):
        c.mesh = (devices, 1, 1)
        run = train(short(c, steps), workdir, progress=False)["run"]
        assert run.mesh.devices.size == devices and int(run.state.step) == steps
    for a, b in zip(jax.tree_util.tree_leaves(run.state.trainable), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_cli_logs_progress_lines_and_refuses_unknown_keys_in_one_line(data_dir, tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text("from tests.fixtures import tiny_caption_config\n\n\ndef get_config():\n"
                           f"    return tiny_caption_config({data_dir!r})\n")
    base = [sys.executable, "-m", "aurora_jax.train", f"--config={config_file}", "--workdir", str(tmp_path / "cli"),
            "--config.max_steps=1", "--config.eval.at_start=False"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    bad = subprocess.run(base + ["--config.optim.lrr=1"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=env)
    assert bad.returncode != 0
    assert (bad.stdout + bad.stderr).strip().splitlines() == [
        "error: unknown config key 'optim.lrr' (in --config.optim.lrr=1); did you mean 'optim.lr'?"]
    for expected in ("INFO trainable params: ", "INFO resumed from step 1"):  # trains 1 step, then resumes
        proc = subprocess.run(base, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert expected in proc.stdout
    diverging = [*base[:5], str(tmp_path / "diverged"), "--config.optim.lr=1e6", "--config.max_nonfinite_steps=2"]
    proc = subprocess.run(diverging, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 2 steps in a row")


def test_invalid_run_json_names_the_file(tmp_path):
    from aurora_jax.train.export import export_run

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"recipe": "blip", "seed": ')
    with pytest.raises(ValueError, match=r"run/config.json is not valid JSON"):
        export_run(str(workdir), str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-m", "aurora_jax.train.export", "--workdir", str(workdir), "--dst",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("export: ")
