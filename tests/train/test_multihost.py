"""Two processes on localhost (4 fake CPU devices each) train, checkpoint and resume exactly like one process
on 8 devices: jax.distributed, per-host data shards, process 0 alone writing, orbax multi-host checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from aurora_jax.train.loop import train
from tests.fixtures import tiny_caption_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
from aurora_jax.parallel import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
import ml_collections as mlc
import numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from aurora_jax.train.loop import train
config = mlc.ConfigDict(json.load(open(sys.argv[3])))
results = train(config, sys.argv[4], progress=False)
assert jax.process_count() == 2 and jax.local_device_count() == 4 and results["run"].mesh.devices.size == 8
if jax.process_index() == 0:
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(results["run"].state.trainable)]
    np.savez(sys.argv[5], *leaves)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(config, workdir: str, out: str, tmp_path) -> None:
    path = tmp_path / f"config_{config.max_steps}.json"
    path.write_text(config.to_json())
    address = f"localhost:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, address, str(i), str(path), workdir, out],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i in range(2)]
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"


def test_two_processes_equal_one_process_including_resume(tmp_path):
    c = tiny_caption_config(str(tmp_path / "tfds_single"))
    c.mesh, c.max_steps, c.eval.at_start = (8, 1, 1), 6, False
    want = [np.asarray(x) for x in jax.tree_util.tree_leaves(train(c, str(tmp_path / "single"),
                                                                    progress=False)["run"].state.trainable)]
    c.data.data_dir = str(tmp_path / "tfds_multi")  # built by process 0 while process 1 waits
    workdir, out = str(tmp_path / "multi"), str(tmp_path / "trainable.npz")
    c.max_steps = 4
    _two_processes(c, workdir, out, tmp_path)
    c.max_steps = 6
    _two_processes(c, workdir, out, tmp_path)  # resumes from step 4, each host from its own data position
    got = np.load(out)
    assert len(got.files) == len(want) > 0
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # one writer, no mix
    data = json.load(open(os.path.join(workdir, "checkpoints", "6", "data", "metadata")))
    assert len(data["hosts"]) == 2
