"""A run killed at any moment resumes from its last checkpoint and ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from aurora_jax.train.loop import train
from tests.fixtures import tiny_caption_config

CHILD = r"""
import json, os, signal, sys
import ml_collections as mlc
import aurora_jax.train.loop as loop

config = mlc.ConfigDict(json.load(open(sys.argv[1])))
sig = getattr(signal, sys.argv[3])
kill_at = int(sys.argv[4])
calls = {"n": 0}
real = loop.global_batch

def counting(batch, mesh):  # the process is signalled while it fetches batch number kill_at
    calls["n"] += 1
    if calls["n"] == kill_at:
        os.kill(os.getpid(), sig)
    return real(batch, mesh)

loop.global_batch = counting
loop.train(config, sys.argv[2], progress=False)
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    config = tiny_caption_config(str(root / "tfds"))
    results = train(config, str(root / "full"), progress=False)
    return root, config, jax.tree_util.tree_map(np.asarray, results["run"].state.trainable), results["steps"]


@pytest.mark.parametrize("sig,kill_at", [("SIGKILL", 6), ("SIGTERM", 4)])
def test_killed_run_resumes_to_identical_params(uninterrupted, sig, kill_at):
    root, config, want, steps = uninterrupted
    workdir = str(root / f"killed_{sig}")
    cfg_path = root / f"config_{sig}.json"
    cfg_path.write_text(config.to_json())
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg_path), workdir, sig, str(kill_at)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    expected_rc = -signal.SIGKILL if sig == "SIGKILL" else 143
    assert proc.returncode == expected_rc, proc.stderr[-3000:]
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved and saved[-1] < steps  # it really stopped early, with a checkpoint behind it
    if sig == "SIGTERM":  # SIGTERM saves the step in flight before leaving
        assert saved[-1] == kill_at
    results = train(config, workdir, progress=False)
    assert results["steps"] == steps
    got = jax.tree_util.tree_map(np.asarray, results["run"].state.trainable)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert rows[-1]["split"] == "eval" and "caption_loss" in rows[-1]


def test_export_folds_the_adapter_into_the_weights(uninterrupted, tmp_path):
    """A finished run exports merged weights: tuned outputs are reproduced from the export (+ its GQT)."""
    import jax.numpy as jnp

    from aurora_jax.convert.store import load_converted, load_converted_extras
    from aurora_jax.models.blip import Blip
    from aurora_jax.peft import tuned_apply
    from aurora_jax.train.export import export_run, load_run

    root, _, _, _ = uninterrupted
    workdir = str(root / "full")
    r = load_run(workdir)
    cfg, base, adapter, peft_cfg = r.cfg, r.base, r.adapter, r.peft_cfg
    dst = export_run(workdir, str(tmp_path / "export"))
    cfg2, merged = load_converted(dst)
    assert cfg2 == cfg
    gqt = load_converted_extras(dst)["gqt"]
    pixels = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
    ids = jnp.array([[cfg.bos_token_id, 5, 6, 7], [cfg.bos_token_id, 8, 9, cfg.pad_token_id]])
    mask = (ids != cfg.pad_token_id).astype(jnp.int32)
    want = tuned_apply(Blip(cfg), base, adapter, peft_cfg, pixels, ids, mask, method=Blip.caption_logits)
    got = tuned_apply(Blip(cfg), merged, {"gqt": gqt}, peft_cfg, pixels, ids, mask, method=Blip.caption_logits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="GQT"):
        export_run(workdir, str(tmp_path / "hf"), fmt="hf")


def test_a_new_run_starts_from_an_exported_adapter(uninterrupted, tmp_path):
    """`--format aurora`, then `adapter_init`: the new run's adapter and trained heads are the exported ones."""
    from aurora_jax.train.export import export_run, load_run
    from aurora_jax.train.loop import setup

    root, config, _, _ = uninterrupted
    r = load_run(str(root / "full"))
    dst = export_run(str(root / "full"), str(tmp_path / "adapter"), fmt="aurora")
    again = config.copy_and_resolve_references()
    again.adapter_init = dst
    run = setup(again, str(tmp_path / "continued"))
    got = jax.tree_util.tree_map(np.asarray, run.state.trainable["adapter"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, jax.tree_util.tree_map(np.asarray, r.adapter))
    again.peft.rank = again.peft.rank * 2
    with pytest.raises(ValueError, match="peft.rank"):
        setup(again, str(tmp_path / "other"))


def test_a_scanned_run_trains_resumes_and_exports_as_the_unrolled_run(uninterrupted, tmp_path):
    """model.scan_layers: the same adapter after the same steps; a checkpoint of one layout resumes in the other;
    the export is per layer (layer_i), as from the unrolled run."""
    from aurora_jax.convert.store import load_converted

    root, config, _, _ = uninterrupted
    runs = {}
    for scan in (False, True):
        c = config.copy_and_resolve_references()
        c.peft.dropout = 0.0  # the adapter's dropout draws per layer differently in the two layouts
        c.model.scan_layers = scan
        c.optim.epochs = 1
        c.export = True
        runs[scan] = train(c, str(tmp_path / f"scan_{scan}"), progress=False)
    flat = [jax.tree_util.tree_leaves_with_path(jax.tree_util.tree_map(np.asarray, runs[s]["run"].state.trainable))
            for s in (False, True)]
    for (path, a), (_, b) in zip(*flat, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    cfg_a, exported_a = load_converted(runs[False]["export"])
    cfg_b, exported_b = load_converted(runs[True]["export"])
    assert cfg_b == cfg_a and not cfg_b.vision.scan and "layer_0" in exported_b["visual_encoder"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), exported_a,
                           exported_b)
    # The scanned run's checkpoint continues unrolled for one more epoch.
    c = config.copy_and_resolve_references()
    c.peft.dropout, c.optim.epochs = 0.0, 2
    more = train(c, str(tmp_path / "scan_True"), progress=False)
    assert more["steps"] == 2 * runs[True]["steps"]
