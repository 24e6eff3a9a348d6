"""`aurora_jax.aot`: the libtpu refusal, the abstract state against the engine's, CPU-topology compiles of tiny
BLIP and Owl steps, and (when libtpu is installed) a TPU compile."""

import importlib.metadata
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax import aot
from aurora_jax.models import layers
from aurora_jax.models.blip import abstract_params
from aurora_jax.parallel.mesh import make_mesh
from aurora_jax.peft import PeftConfig
from aurora_jax.train.config import base_config
from aurora_jax.train.loop import check_batch, optimizer_for
from aurora_jax.train.recipes.blip import abstract_momentum_state, init_momentum_state
from aurora_jax.train.state import abstract_state, base_shardings, init_state
from tests.fixtures import tiny_blip_config


def tiny_blip(task: str = "caption"):
    c = base_config("blip")
    c.task, c.model.size, c.model.image_size, c.peft.rank = task, "tiny", 16, 4
    c.data.name, c.data.max_len, c.optim.batch_size, c.mesh = "shapes", 8, 4, (1, 2, 1)
    return c


def tiny_owl():
    c = base_config("owl")
    c.model.image_size, c.model.num_queries, c.model.width, c.model.vision_width = 16, 4, 64, 32
    c.data.max_len, c.optim.batch_size, c.mesh = 32, 4, (1, 2, 1)
    return c


# ------------------------------------------------------------------------------------------------ libtpu


def test_refuses_without_libtpu(monkeypatch):
    monkeypatch.setattr(aot, "installed_libtpu", lambda: None)
    with pytest.raises(aot.LibtpuError, match=r"libtpu wheel, which is not installed: pip install \"aurora-jax\[aot"):
        aot.target("v5e:2x4")
    req = aot.libtpu_requirement()
    with pytest.raises(aot.LibtpuError) as e:
        aot.check_libtpu()
    assert req is None or req in str(e.value)
    assert "--topology cpu:N" in str(e.value)


def test_refuses_libtpu_of_another_jax(monkeypatch):
    monkeypatch.setattr(aot, "libtpu_requirement", lambda: "libtpu==0.0.42.*")
    monkeypatch.setattr(aot, "installed_libtpu", lambda: "0.0.40")
    with pytest.raises(aot.LibtpuError, match=r"libtpu 0.0.40 does not match jax .*pins libtpu==0.0.42.\*"):
        aot.check_libtpu()
    monkeypatch.setattr(aot, "installed_libtpu", lambda: "0.0.42.1")
    assert aot.check_libtpu() == "0.0.42.1"


def test_libtpu_pin_read_from_jax_metadata(monkeypatch):
    if importlib.metadata.version("jax") == "0.10.2":
        assert aot.libtpu_requirement() == "libtpu==0.0.42.*"
    # Another jax names another pin in its tpu extra: the tool follows it.
    monkeypatch.setattr(importlib.metadata, "requires",
                        lambda name: ["numpy>=1.26", 'libtpu==0.0.47.*; extra == "tpu"', 'requests; extra == "tpu"'])
    assert aot.libtpu_requirement() == "libtpu==0.0.47.*"


def test_topology_names():
    assert aot.parse_topology("v5e:2x4") == ("v5e", "2x4")
    assert aot.parse_topology("cpu:8") == ("cpu", "8")
    for bad in ("v5e", "v7:2x4", "cpu:2x4", "v4:8"):
        with pytest.raises(ValueError, match="--topology"):
            aot.parse_topology(bad)
    with pytest.raises(ValueError, match="the host has 8 CPU devices"):
        aot.target("cpu:64")


def test_oom_message_numbers():
    gib = 1024**3
    assert aot.oom_numbers("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. HLO temporaries (16.93G) exceeds "
                           "available HBM (15.75G)") == pytest.approx((16.93 * gib, 15.75 * gib))
    assert aot.oom_numbers("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm. "
                           "Exceeded hbm capacity by 4.75G.") == pytest.approx((20.5 * gib, 15.75 * gib))
    assert aot.oom_numbers("INTERNAL: something else") is None


# ------------------------------------------------------------------------------------------------ engine


def test_abstract_state_is_the_engines_state():
    """What aot compiles for = what `init_state` builds: shapes, dtypes and shardings, momentum model included."""
    cfg = tiny_blip_config()
    mesh = make_mesh((1, 2, 1), jax.devices()[:2])
    c = tiny_blip("retrieval")
    tx = optimizer_for(c, 10)
    peft_cfg = PeftConfig(method="aurora", rank=4)
    base_sh = base_shardings(abstract_params(cfg, boxed=True), mesh)
    kw = dict(base_sh=base_sh, embed_dim=cfg.embed_dim, seed=0, queue_size=8)
    base = layers.lecun_random_params(abstract_params(cfg), 0)
    real, frozen, (real_sh, frozen_sh) = init_state(base, peft_cfg, tx, mesh, base_sh, seed=0, frozen_dtype="bfloat16",
                                                    extend=partial(init_momentum_state, **kw))
    fake, fake_frozen, (fake_sh, fake_frozen_sh) = abstract_state(
        abstract_params(cfg), peft_cfg, tx, mesh, base_sh, seed=0, frozen_dtype="bfloat16",
        extend=partial(abstract_momentum_state, **kw))

    def described(tree, shardings):
        return jax.tree_util.tree_map(lambda x, s: (x.shape, str(x.dtype), s.spec), tree, shardings)

    assert described(real, real_sh) == described(fake, fake_sh)
    assert described(frozen, frozen_sh) == described(fake_frozen, fake_frozen_sh)
    assert jax.tree_util.tree_map(lambda x: x.sharding.spec, real) == jax.tree_util.tree_map(
        lambda x: x.sharding.spec, fake)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree_util.tree_leaves(fake_frozen_sh))


def test_batch_check_names_the_mismatch():
    layout = {"image": jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32), "valid": jax.ShapeDtypeStruct((4,), jnp.int32)}
    check_batch({"image": np.zeros((4, 8, 8, 3), np.float32), "valid": np.ones(4, np.int32)}, layout)
    with pytest.raises(RuntimeError, match=r"image: float32\[4, 9, 8, 3\] != layout float32\[4, 8, 8, 3\]; "
                                           r"valid: missing from the batch"):
        check_batch({"image": np.zeros((4, 9, 8, 3), np.float32)}, layout)


# ------------------------------------------------------------------------------------------------ compiles


@pytest.mark.parametrize("make", [tiny_blip, tiny_owl], ids=["blip", "owl"])
def test_cpu_topology_compiles_the_step(make):
    report = aot.compile_report(make(), "cpu:2")
    text = aot.format_report(report)
    assert report["fits"] and "FITS" in text and "DOES NOT FIT" not in text
    assert report["flops"] > 0 and report["temp_bytes"] > 0 and report["chips"] == 2
    # The optimizer holds AdamW's two float32 moments of what trains (+ a step count).
    assert 2 * report["trainable_bytes"] <= report["opt_state_bytes"] <= 2 * report["trainable_bytes"] + 64
    assert report["params_bytes"] == report["frozen_bytes"] + report["trainable_bytes"]
    assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                     + report["temp_bytes"] + report["code_bytes"])


def test_scanned_layers_compile_to_the_same_state_and_every_layers_flops():
    """model.scan_layers: the same per-chip parameters and optimizer state; XLA counts the loop body once, and the
    report costs every layer (from 1- and 2-layer compiles): the unrolled step's flops and bytes."""
    c = tiny_blip("retrieval")
    unrolled = aot.compile_report(c, "cpu:2")
    c.model.scan_layers = True
    scanned = aot.compile_report(c, "cpu:2")
    for key in ("params_bytes", "opt_state_bytes", "other_state_bytes", "batch_bytes"):
        assert scanned[key] == unrolled[key], key
    assert scanned["stack_depths"] == [2, 2] and scanned["xla_loop_flops"] < 0.8 * unrolled["flops"]
    assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.02)
    assert scanned["bytes_accessed"] == pytest.approx(unrolled["bytes_accessed"], rel=0.05)
    assert "XLA counts a loop body once" in aot.format_report(scanned)


@pytest.mark.skipif(aot.installed_libtpu() is None, reason="libtpu is not installed (pip install 'aurora-jax[aot]')")
def test_tpu_compile_of_a_tiny_owl_with_flash_attention():
    c = tiny_owl()
    c.model.attention_impl = "flash"
    c.data.max_len = 128  # the kernel's blocks
    c.mesh = (1, -1, 1)
    c.optim.batch_size = 8
    report = aot.compile_report(c, "v5e:2x4")
    assert report["fits"] and report["chips"] == 8 and report["libtpu"] == aot.installed_libtpu()
    assert report["flops"] > 0 and report["step_s"] > 0 and report["unit"] == "tok/s"
    assert report["hbm_bytes"] == 16 * 1024**3
