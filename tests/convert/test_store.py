"""The streamed orbax writer: leaves written as they arrive restore exactly, also into shardings."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aurora_jax.convert.store import CONFIG_FILE, StreamedTree, load_converted, save_converted
from aurora_jax.models.llama import LlamaConfig

CFG = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=2)


def leaves() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer_0/attn/q_proj/kernel": rng.standard_normal((8, 8)).astype(np.float32),
        "layer_0/mlp/up_proj/kernel": rng.standard_normal((8, 12)).astype(ml_dtypes.bfloat16),
        "embed_tokens/embedding": rng.standard_normal((16, 8)).astype(np.float16),
        "step": np.array(7, np.int64),
        "mask": rng.integers(0, 2, (3,)).astype(bool),
    }


def streamed(flat: dict[str, np.ndarray], order=reversed) -> StreamedTree:
    return StreamedTree({k: (v.shape, v.dtype) for k, v in flat.items()}, ((k, flat[k]) for k in order(list(flat))))


def assert_exact(tree, flat: dict[str, np.ndarray]) -> None:
    got = traverse_util.flatten_dict(tree, sep="/")
    assert got.keys() == flat.keys()
    for k, want in flat.items():
        x = np.asarray(got[k])
        assert x.dtype == want.dtype and x.shape == want.shape, k
        assert x.tobytes() == want.tobytes(), k  # bit for bit


@pytest.mark.parametrize("compress", [False, True])
def test_streamed_round_trip_is_exact(tmp_path, compress):
    flat = leaves()
    save_converted(tmp_path, CFG, streamed(flat), compress=compress)
    cfg, params = load_converted(tmp_path)
    assert cfg == CFG
    assert_exact(params, flat)
    # Same checkpoint as writing the whole tree at once.
    save_converted(tmp_path / "whole", CFG, traverse_util.unflatten_dict(flat, sep="/"), compress=compress)
    assert_exact(load_converted(tmp_path / "whole")[1], flat)
    # A numpy scalar in a whole tree comes back as an array, as orbax's StandardCheckpointer keeps it.
    save_converted(tmp_path / "scalar", CFG, {"temp": np.float32(0.07)}, compress=compress)
    temp = load_converted(tmp_path / "scalar")[1]["temp"]
    assert isinstance(temp, np.ndarray) and temp.dtype == np.float32 and temp == np.float32(0.07)


def test_streamed_restores_into_shardings(tmp_path):
    flat = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(8, ml_dtypes.bfloat16)}
    save_converted(tmp_path, CFG, streamed(flat))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(-1), ("fsdp",))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in flat.items()}
    _, params = load_converted(tmp_path, target=target)
    for k, v in flat.items():
        assert isinstance(params[k], jax.Array) and params[k].sharding == sharding
        np.testing.assert_array_equal(np.asarray(params[k]), v)


def test_streamed_extras(tmp_path):
    from aurora_jax.convert.store import load_converted_extras

    flat = leaves()
    queues = {"queues/ptr_queue": np.zeros(1, np.int64), "queues/image_queue": np.ones((4, 2), np.float32)}
    save_converted(tmp_path, CFG, streamed(flat), extras=streamed(queues, order=list))
    assert_exact(load_converted_extras(tmp_path), queues)


def test_stream_errors_leave_nothing_behind(tmp_path):
    flat = leaves()

    def failing():
        yield "step", flat["step"]
        raise RuntimeError("source went away")

    declared = {k: (v.shape, v.dtype) for k, v in flat.items()}
    with pytest.raises(RuntimeError, match="source went away"):
        save_converted(tmp_path / "a", CFG, StreamedTree(declared, failing()))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == []  # no params, no temporary folder, no config
    with pytest.raises(ValueError, match=r"the stream ended without 4 declared leaves"):
        save_converted(tmp_path / "b", CFG, StreamedTree(declared, iter([("step", flat["step"])])))
    wrong = {**flat, "step": np.array(7, np.int32)}
    with pytest.raises(ValueError, match=r"'step': declared \[\] int64, got \[\] int32"):
        save_converted(tmp_path / "c", CFG, StreamedTree(declared, iter(wrong.items())))
    with pytest.raises(ValueError, match="'extra' was not declared"):
        save_converted(tmp_path / "d", CFG, StreamedTree(declared, iter([("extra", flat["step"])])))
    assert not any((tmp_path / d / CONFIG_FILE).exists() for d in "abcd")


def test_failed_overwrite_drops_the_old_config(tmp_path):
    flat = leaves()
    save_converted(tmp_path, CFG, streamed(flat))

    def failing():
        raise RuntimeError("bad weights")
        yield  # a generator

    with pytest.raises(RuntimeError):
        save_converted(tmp_path, CFG, StreamedTree({k: (v.shape, v.dtype) for k, v in flat.items()}, failing()),
                       force=True)
    assert not (tmp_path / CONFIG_FILE).exists()  # the folder no longer claims a complete conversion


@pytest.mark.parametrize("flags", [[], ["--no-compress"]])
def test_llama_cli_streams_the_same_params(tmp_path, flags):
    from aurora_jax.convert import cli
    from aurora_jax.convert.llama import convert_llama
    from tests.fixtures import assert_trees_equal, make_hf_llama

    make_hf_llama(5).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    dst = tmp_path / "out"
    assert cli.main(["llama", "--src", str(tmp_path / "hf"), "--dst", str(dst), "--no-progress", *flags]) == 0
    cfg, params = load_converted(dst)
    want_cfg, want = convert_llama(tmp_path / "hf")
    assert cfg == want_cfg
    assert_trees_equal(params, want)
