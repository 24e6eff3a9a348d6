"""The same train step on different meshes of the 8 fake CPU devices gives the same loss and adapters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.models.blip import Blip, init_params
from aurora_jax.parallel.mesh import make_mesh
from aurora_jax.peft import PeftConfig
from aurora_jax.tasks.retrieval import retrieval_loss
from aurora_jax.train.optim import make_optimizer
from aurora_jax.train.recipes.blip import init_train_state
from aurora_jax.train.state import global_batch, jit_train_step, make_train_step
from tests.fixtures import tiny_blip_config

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (4, 1, 2)]  # (data, fsdp, tensor)


def _batch(cfg, b=8, t=8):
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 90, size=(b, t)).astype(np.int32)
    ids[:, 0] = 1
    mask = np.ones((b, t), np.int32)
    mask[::3, -2:] = 0
    s = cfg.vision.image_size
    return {"image": rng.standard_normal((b, s, s, 3)).astype(np.float32), "text_ids": ids, "text_mask": mask,
            "image_index": np.array([0, 1, 2, 3, 3, 5, 6, 7], np.int32)}  # two captions of image 3


def _run(mesh_shape, cfg, base, peft_cfg):
    mesh = make_mesh(mesh_shape)
    tx = make_optimizer(lambda step: 1e-2, weight_decay=0.05)
    state, frozen, shardings = init_train_state(cfg, base, peft_cfg, tx, mesh, seed=0)

    def loss(fwd, batch, rng, base):
        return retrieval_loss(fwd, batch, rng, temp=base["temp"], enc_token_id=cfg.enc_token_id)

    step = jit_train_step(make_train_step(Blip(cfg), peft_cfg, tx, loss), mesh, *shardings)
    batch = global_batch(_batch(cfg), mesh)
    losses = []
    for _ in range(2):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree_util.tree_map(np.asarray, state.trainable)


def _one_layer(cfg):
    """The tiny BLIP with one block per tower: the same code paths, half the compile time per mesh."""
    return cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=1),
                       text=dataclasses.replace(cfg.text, num_layers=1))


def test_same_step_on_every_mesh():
    assert len(jax.devices()) == 8
    cfg = _one_layer(tiny_blip_config("retrieval"))
    base = init_params(cfg, jax.random.key(0))
    # Dropout on: the same keys must give the same masks whatever the sharding.
    peft_cfg = PeftConfig(method="aurora", rank=4, dropout=0.1)
    ref_losses, ref_trainable = _run(MESHES[0], cfg, base, peft_cfg)
    assert ref_losses[1] != ref_losses[0]  # the first step changed something
    for shape in MESHES[1:]:
        losses, trainable = _run(shape, cfg, base, peft_cfg)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(shape))
        for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(ref_trainable)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=str(shape))


def test_frozen_weights_are_sharded_by_logical_axes():
    cfg = tiny_blip_config("retrieval")
    base = init_params(cfg, jax.random.key(0))
    mesh = make_mesh((2, 2, 2))
    tx = make_optimizer(lambda step: 1e-3, weight_decay=0.0)
    state, frozen, _ = init_train_state(cfg, base, PeftConfig(rank=4), tx, mesh, seed=0)
    qkv = frozen["visual_encoder"]["layer_0"]["attn"]["qkv"]["kernel"]
    assert tuple(qkv.sharding.spec) == ("fsdp", "tensor")
    assert qkv.addressable_shards[0].data.shape == (16, 48)
    assert jnp.dtype(qkv.dtype) == jnp.float32
    # the adapter is small and replicated
    u = state.trainable["adapter"]["shared"]["U"]
    assert u.sharding.is_fully_replicated
