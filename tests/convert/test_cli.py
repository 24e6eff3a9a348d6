"""CLI and converted-folder round trips: subprocess end to end, registry dispatch, orbax storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aurora_jax.convert import cli
from aurora_jax.convert.blip import load_blip
from aurora_jax.convert.store import CONFIG_FILE, load_converted, load_converted_extras, save_converted
from tests.fixtures import assert_trees_equal, salesforce_state, state_dict_np

REPO = Path(__file__).resolve().parents[2]


def run_py(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one device is enough in a child process
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300, **kw)


def test_cli_end_to_end(hf_blip, tmp_path):
    src = hf_blip["retrieval"][1]
    dst = tmp_path / "out"
    args = ["-m", "aurora_jax.convert", "blip", "--src", str(src), "--dst", str(dst), "--dtype", "bfloat16",
            "--image-size", "48"]
    res = run_py(args)
    assert res.returncode == 0, res.stderr
    assert "BLIP tensors" in res.stderr  # tqdm progress bar
    info = json.loads((dst / CONFIG_FILE).read_text())
    assert info["config_class"] == "aurora_jax.models.blip:BlipConfig"
    assert sorted(info["meta"]["tokenizer_files"]) == ["tokenizer_config.json", "vocab.txt"]
    assert (dst / "vocab.txt").read_text() == (src / "vocab.txt").read_text()
    cfg, params = load_converted(dst)
    want_cfg, want = load_blip(src, dtype="bfloat16", image_size=48)
    assert cfg == want_cfg
    assert_trees_equal(params, want)
    # Refuses to overwrite without --force.
    res = run_py(args)
    assert res.returncode != 0 and "already holds" in res.stderr
    assert run_py([*args, "--force"]).returncode == 0


def test_safetensors_path_never_imports_torch(hf_blip):
    code = (
        "import sys; from aurora_jax.convert import load_blip; load_blip(sys.argv[1]); "
        "bad = [m for m in ('torch', 'grain', 'tensorflow_datasets', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    res = run_py(["-c", code, str(hf_blip["vqa"][1])])
    assert res.returncode == 0, res.stderr


def test_cli_salesforce_momentum_in_process(hf_blip, tmp_path, capsys):
    from aurora_jax.convert.blip import cli as blip_cli

    sd = salesforce_state(state_dict_np(hf_blip["retrieval"][0]), momentum=True)
    torch.save({"model": sd}, tmp_path / "model_retrieval.pth")
    dst = tmp_path / "out"
    assert blip_cli(["--src", str(tmp_path / "model_retrieval.pth"), "--dst", str(dst), "--momentum",
                     "--no-progress", "--vision-heads", "4", "--text-heads", "4"]) == 0
    assert "with momentum extras" in capsys.readouterr().out
    cfg, params = load_converted(dst)
    extras = load_converted_extras(dst)
    assert cfg.task == "retrieval" and float(params["temp"]) == pytest.approx(0.05)
    assert cfg.vision.num_heads == cfg.text.num_heads == 4
    np.testing.assert_array_equal(extras["queues"]["text_queue"], sd["text_queue"].numpy())
    np.testing.assert_allclose(extras["momentum"]["vision_proj"]["kernel"],
                               params["vision_proj"]["kernel"] + 1, atol=1e-6)


def test_registry_dispatch(monkeypatch, capsys):
    assert cli.main([]) == 2 and "blip" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown source 'nope'.*blip"):
        cli.main(["nope"])
    monkeypatch.setitem(cli.SOURCES, "later", "aurora_jax.convert.not_written_yet:cli")
    with pytest.raises(SystemExit, match="aurora_jax.convert.not_written_yet does not exist yet"):
        cli.main(["later", "--src", "x", "--dst", "y"])
    seen = []
    monkeypatch.setitem(cli.SOURCES, "toy", "tests.convert.test_cli:_toy_cli")
    globals()["_toy_cli"] = lambda argv: seen.append(argv) or 0
    assert cli.main(["toy", "--src", "a"]) == 0 and seen == [["--src", "a"]]
    with pytest.raises(ValueError):
        cli.register("bad", "no_colon")


def test_store_round_trip_with_target(hf_blip, tmp_path):
    import jax

    cfg, params = load_blip(hf_blip["caption"][1])
    save_converted(tmp_path, cfg, params, meta={"note": "x"})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    cfg2, restored = load_converted(tmp_path, target=abstract)
    assert cfg2 == cfg
    assert_trees_equal(restored, params)
    assert load_converted_extras(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no aurora_config.json"):
        load_converted(tmp_path / "missing")
