"""Momentum distillation: EMA, queues, alpha ramp, and a jitted retrieval train step carrying both."""

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aurora_jax.models.blip import Blip
from aurora_jax.parallel.mesh import make_mesh
from aurora_jax.peft import PeftConfig, combine, partition, tuned_apply
from aurora_jax.tasks.momentum import (
    NO_INDEX,
    alpha_ramp,
    ema_update,
    enqueue,
    init_momentum,
    init_queues,
    momentum_params,
    queues_from_checkpoint,
    update_momentum,
)
from aurora_jax.train.config import base_config
from aurora_jax.train.optim import make_optimizer
from aurora_jax.train.recipes.blip import init_train_state, task_loss_fn
from aurora_jax.train.state import TrainState, global_batch, jit_train_step, make_train_step
from tests.fixtures import fast_init, tiny_blip_config

EMA = 0.995


def test_ema_update_math():
    mom = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0, jnp.float32)}}
    online = {"a": jnp.array([0.0, 2.0]), "b": {"c": jnp.array(0.0, jnp.bfloat16)}}
    out = ema_update(mom, online, 0.9)
    np.testing.assert_allclose(out["a"], [0.9, 2.0])
    assert float(out["b"]["c"]) == pytest.approx(3.6) and out["b"]["c"].dtype == jnp.float32


def _toy_trees():
    trainable = {"adapter": {"U": jnp.ones((2, 2))},
                 "base": {"vision_proj": {"kernel": jnp.zeros((2, 3))}, "itm_head": {"kernel": jnp.ones((2, 2))}}}
    frozen = {"visual_encoder": {"w": jnp.zeros((2,), jnp.bfloat16)}, "text_proj": {"kernel": jnp.zeros((2, 3))},
              "temp": jnp.array(0.07)}
    ckpt = {"visual_encoder": {"w": np.full((2,), 2.0)}, "vision_proj": {"kernel": np.full((2, 3), 5.0)},
            "text_proj": {"kernel": np.full((2, 3), 7.0)}}
    return trainable, frozen, ckpt


def test_init_momentum_from_online_and_from_checkpoint_copies():
    trainable, frozen, ckpt = _toy_trees()
    plain = init_momentum(trainable, frozen)
    assert set(plain) == {"trainable"}
    np.testing.assert_array_equal(plain["trainable"]["adapter"]["U"], trainable["adapter"]["U"])
    assert plain["trainable"]["adapter"]["U"] is not trainable["adapter"]["U"]  # own buffer (donation)

    mom = init_momentum(trainable, frozen, ckpt)
    np.testing.assert_array_equal(mom["trainable"]["base"]["vision_proj"]["kernel"], 5.0)  # trained head: copy
    np.testing.assert_array_equal(mom["trainable"]["adapter"]["U"], 1.0)  # no adapter in the checkpoint
    head, online_head = mom["trainable"]["base"]["itm_head"]["kernel"], trainable["base"]["itm_head"]["kernel"]
    assert head is not online_head  # its own buffer, though the checkpoint has no copy of it
    assert set(mom["frozen"]) == {"visual_encoder", "text_proj"}
    assert mom["frozen"]["visual_encoder"]["w"].dtype == jnp.float32  # EMA state kept in f32

    base_m, adapter_m = momentum_params(mom, frozen, trainable)
    assert base_m["visual_encoder"]["w"].dtype == jnp.bfloat16  # computes like the online model
    np.testing.assert_array_equal(base_m["visual_encoder"]["w"].astype(jnp.float32), 2.0)
    np.testing.assert_array_equal(base_m["text_proj"]["kernel"], 7.0)
    np.testing.assert_array_equal(base_m["vision_proj"]["kernel"], 5.0)
    assert float(base_m["temp"]) == pytest.approx(0.07)  # shared with the online model

    with pytest.raises(KeyError, match="itm_head"):
        init_momentum(trainable, frozen, dict(ckpt, itm_head={"bias": np.zeros(2)}))


def test_momentum_averages_factors_and_gqt_but_reads_the_live_shared_uvc():
    """The release's momentum encoders hold their own per-site factors and GQT (EMA) and use the live U/V/C."""
    adapter = {"shared": {"U": jnp.ones((3, 2)), "V": jnp.zeros((2, 3)), "C": jnp.ones((2, 2, 2))},
               "factors": {"visual_encoder": {"layer_0": {"attn": jnp.ones((2, 4))}}},
               "gqt": {"text_encoder": {"layer_0": {"a_s": jnp.ones((3,))}}}}
    trainable, frozen = {"adapter": adapter, "base": {"vision_proj": {"kernel": jnp.ones((3, 2))}}}, {}
    mom = init_momentum(trainable, frozen)
    assert set(mom["trainable"]["adapter"]) == {"factors", "gqt"}  # no EMA copy of U/V/C
    stepped = jax.tree_util.tree_map(lambda x: x + 1.0, trainable)  # the online model after an update
    mom = update_momentum(mom, stepped, frozen, EMA)
    np.testing.assert_allclose(mom["trainable"]["adapter"]["factors"]["visual_encoder"]["layer_0"]["attn"],
                               EMA + 2 * (1 - EMA), rtol=1e-6)
    np.testing.assert_allclose(mom["trainable"]["adapter"]["gqt"]["text_encoder"]["layer_0"]["a_s"],
                               EMA + 2 * (1 - EMA), rtol=1e-6)
    _, adapter_m = momentum_params(mom, frozen, stepped)
    for k in ("U", "V", "C"):  # exactly the online ones, not an average
        np.testing.assert_array_equal(adapter_m["shared"][k], stepped["adapter"]["shared"][k])
    # A release checkpoint's momentum factors/GQT start the teacher's own copies.
    ckpt_adapter = jax.tree_util.tree_map(lambda x: np.full(x.shape, 7.0), {"factors": adapter["factors"],
                                                                           "gqt": adapter["gqt"]})
    mom = init_momentum(trainable, frozen, {"adapter": ckpt_adapter})
    assert float(mom["trainable"]["adapter"]["factors"]["visual_encoder"]["layer_0"]["attn"][0, 0]) == 7.0


class _Toy(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return nn.Dropout(0.5)(nn.Dense(4, kernel_init=nn.initializers.ones)(x), deterministic=deterministic)


@pytest.mark.parametrize("teacher_dropout", [True, False])
def test_teacher_runs_in_train_mode_with_masks_of_its_own(teacher_dropout):
    model, x = _Toy(), jnp.ones((2, 8))
    base = model.init(jax.random.key(0), x)["params"]
    peft_cfg = PeftConfig(method="full")
    trainable, frozen = partition(base, {}, peft_cfg)
    tx = optax.sgd(0.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                       rng=jax.random.key_data(jax.random.key(1)), momentum=init_momentum(trainable, frozen), queues={})

    def loss(fwd, batch, rng, base, teacher):
        y, y_m = fwd(_Toy.__call__, batch["x"]), teacher.fwd(_Toy.__call__, batch["x"])
        return jnp.sum(y), ({"y": y, "y_m": y_m}, teacher.queues)

    step = make_train_step(model, peft_cfg, tx, loss, teacher_dropout=teacher_dropout)
    _, metrics = jax.jit(step)(state, frozen, {"x": x})
    y, y_m = np.asarray(metrics["y"]), np.asarray(metrics["y_m"])
    assert (y == 0).any()  # the student drops
    if teacher_dropout:
        assert (y_m == 0).any() and not np.array_equal(y_m == 0, y == 0)  # its own masks
        assert set(np.unique(y_m)) <= {0.0, 16.0}
    else:
        np.testing.assert_array_equal(y_m, 8.0)


def test_update_momentum_moves_every_copy_towards_the_online_model():
    trainable, frozen, ckpt = _toy_trees()
    mom = update_momentum(init_momentum(trainable, frozen, ckpt), trainable, frozen, EMA)
    np.testing.assert_allclose(mom["trainable"]["base"]["vision_proj"]["kernel"], EMA * 5.0, rtol=1e-6)
    np.testing.assert_allclose(mom["frozen"]["visual_encoder"]["w"], EMA * 2.0, rtol=1e-6)
    np.testing.assert_allclose(mom["frozen"]["text_proj"]["kernel"], EMA * 7.0, rtol=1e-6)


def _feats(n, d, value):
    return jnp.full((n, d), float(value))


def test_enqueue_pointer_and_wrap():
    q = init_queues(jax.random.key(0), 6, 3)
    assert q["image_feat"].shape == (6, 3) and (q["idx"] == NO_INDEX).all() and int(q["ptr"]) == 0
    np.testing.assert_allclose(jnp.linalg.norm(q["text_feat"], axis=-1), 1.0, rtol=1e-5)
    ptrs = []
    for step in range(4):  # 4 batches of 2 into 6 slots: the 4th overwrites the oldest
        q = enqueue(q, _feats(2, 3, step), _feats(2, 3, -step), jnp.array([10 * step, 10 * step + 1]))
        ptrs.append(int(q["ptr"]))
    assert ptrs == [2, 4, 0, 2]
    np.testing.assert_array_equal(q["idx"], [30, 31, 10, 11, 20, 21])
    np.testing.assert_array_equal(q["image_feat"][:, 0], [3, 3, 1, 1, 2, 2])
    np.testing.assert_array_equal(q["text_feat"][:, 0], [-3, -3, -1, -1, -2, -2])
    with pytest.raises(ValueError, match="multiple"):
        enqueue(q, _feats(4, 3, 0), _feats(4, 3, 0), jnp.arange(4))
    q = jax.jit(enqueue)(q, _feats(2, 3, 9), _feats(2, 3, 9), jnp.array([7, 7]))  # traced pointer
    assert int(q["ptr"]) == 4 and q["idx"][2:4].tolist() == [7, 7]


def test_queues_from_salesforce_buffers(caplog):
    rng = np.random.default_rng(0)
    buffers = {"image_queue": rng.standard_normal((3, 8)), "text_queue": rng.standard_normal((3, 8)),
               "idx_queue": np.arange(8)[None], "ptr_queue": np.array([4])}
    q = queues_from_checkpoint(buffers, 8, 3, jax.random.key(0))
    np.testing.assert_allclose(q["image_feat"], buffers["image_queue"].T, rtol=1e-6)
    assert q["idx"].tolist() == list(range(8)) and int(q["ptr"]) == 4
    # A pre-training checkpoint: features only (its queue_ptr belongs to another model).
    pre = {k: buffers[k] for k in ("image_queue", "text_queue")} | {"queue_ptr": np.array([3])}
    q = queues_from_checkpoint(pre, 8, 3, jax.random.key(0))
    assert (q["idx"] == NO_INDEX).all() and int(q["ptr"]) == 0
    with caplog.at_level(logging.WARNING, logger="aurora_jax"):
        q = queues_from_checkpoint(buffers, 16, 3, jax.random.key(0))  # another queue size: fresh queues
    assert q["image_feat"].shape == (16, 3) and "fresh" in caplog.text


def test_alpha_ramp_over_the_first_epoch():
    got = [float(alpha_ramp(0.4, s, 10)) for s in (0, 5, 10, 25)]
    np.testing.assert_allclose(got, [0.0, 0.2, 0.4, 0.4], rtol=1e-6)
    assert float(jax.jit(lambda s: alpha_ramp(0.4, s, 4))(jnp.int32(1))) == pytest.approx(0.1)


# ------------------------------------------------------------------------------------- train step

BATCH, QUEUE, STEPS_PER_EPOCH = 4, 8, 2
PARTS = ("visual_encoder", "text_encoder", "vision_proj", "text_proj")  # Salesforce `*_m` copies


def _batch(cfg):
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 90, size=(BATCH, 8)).astype(np.int32)
    ids[:, 0] = 1
    s = cfg.vision.image_size
    return {"image": rng.standard_normal((BATCH, s, s, 3)).astype(np.float32), "text_ids": ids,
            "text_mask": np.ones((BATCH, 8), np.int32), "image_index": np.array([3, 5, 5, 8], np.int32)}


def _get(tree, path=("text_encoder", "layer_0", "self_attn", "query", "kernel")):
    for key in path:
        tree = tree[key]
    return tree


def test_retrieval_step_with_momentum(tmp_path):
    """Two jitted steps on a (data=2, fsdp=2) mesh from checkpoint copies: queues, EMA, sharding, checkpoint."""
    from aurora_jax.train.checkpoint import Checkpointer

    cfg = tiny_blip_config("retrieval")
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=1),
                      text=dataclasses.replace(cfg.text, num_layers=1))  # one layer each: compiles faster
    base = fast_init(cfg, 0)
    peft_cfg = PeftConfig(method="aurora", rank=4, dropout=0.0)
    config = base_config()
    config.momentum.enabled = True
    config.mesh = (2, 2, 1)  # 4 shards of one row: per-GPU ITC pools, hard negatives from the global batch
    config.loss.negative_all_rank = True
    mesh = make_mesh(config.mesh)
    tx = make_optimizer(lambda step: 1e-2, weight_decay=0.05)
    # Copies as in a Salesforce checkpoint: the image side equals the online model, the text encoder is off by one.
    ckpt_m = {p: jax.tree_util.tree_map(lambda x, p=p: np.asarray(x) + (p == "text_encoder"), base[p])
              for p in PARTS}
    d = cfg.embed_dim
    buffers = {"image_queue": np.ones((d, QUEUE)), "text_queue": np.ones((d, QUEUE)),
               "idx_queue": np.full((1, QUEUE), 42), "ptr_queue": np.array([BATCH])}
    state, frozen, shardings = init_train_state(cfg, base, peft_cfg, tx, mesh, seed=0, momentum=True,
                                                queue_size=QUEUE,
                                                momentum_init={"momentum": ckpt_m, "queues": buffers})
    loss = task_loss_fn(config, cfg, peft_cfg, steps_per_epoch=STEPS_PER_EPOCH)
    step = jit_train_step(make_train_step(Blip(cfg), peft_cfg, tx, loss, ema=EMA), mesh, *shardings)
    batch = global_batch(_batch(cfg), mesh)

    assert _get(state.momentum["frozen"]).sharding == _get(frozen).sharding  # fsdp-sharded like the base
    assert set(state.momentum["frozen"]) == {"visual_encoder", "text_encoder", "text_proj"}
    assert int(state.queues["ptr"]) == BATCH and state.queues["idx"].tolist() == [42] * QUEUE
    init_trainable = jax.tree_util.tree_map(np.asarray, state.trainable)
    # The image side of the teacher is the online model at step 0: it enqueues the online image features.

    @jax.jit
    def online_feats(trainable, frozen, batch):
        base, adapter = combine(trainable, frozen)
        fwd = lambda *a, method: tuned_apply(Blip(cfg), base, adapter, peft_cfg, *a, method=method)
        image = fwd(fwd(batch["image"], method=Blip.encode_image), method=Blip.image_feat)
        return image, fwd(fwd(batch["text_ids"], batch["text_mask"], method=Blip.encode_text), method=Blip.text_feat)

    image_feat0, text_feat0 = map(np.asarray, online_feats(state.trainable, frozen, batch))

    state, m1 = step(state, frozen, batch)
    after_first = jax.tree_util.tree_map(np.asarray, state.trainable)
    q = state.queues
    assert int(q["ptr"]) == 0  # wrapped: BATCH + BATCH == QUEUE
    assert q["idx"].tolist() == [42] * BATCH + [3, 5, 5, 8]
    np.testing.assert_array_equal(q["image_feat"][:BATCH], 1.0)  # untouched slots
    np.testing.assert_allclose(q["image_feat"][BATCH:], image_feat0, rtol=1e-4, atol=1e-6)
    assert not np.allclose(q["text_feat"][BATCH:], text_feat0, atol=1e-3)  # the text teacher is the copy
    # Frozen copies follow the (constant) online base: online + 0.995 after one EMA step.
    np.testing.assert_allclose(_get(state.momentum["frozen"]), np.asarray(_get(frozen)) + EMA, rtol=1e-5)

    state, m2 = step(state, frozen, batch)
    assert int(state.queues["ptr"]) == BATCH and state.queues["idx"].tolist() == [3, 5, 5, 8] * 2
    # The second step's EMA pulled the momentum factors 0.5% of the way to the updated online ones (U/V/C: live).
    assert "shared" not in state.momentum["trainable"]["adapter"]
    got, init, new = (jax.tree_util.tree_leaves(t["adapter"]["factors"])
                      for t in (state.momentum["trainable"], init_trainable, after_first))
    assert any(not np.allclose(a, b) for a, b in zip(init, new))
    for g, a, b in zip(got, init, new):
        np.testing.assert_allclose(g, EMA * a + (1 - EMA) * b, rtol=1e-5, atol=1e-7)
    assert float(m1["alpha"]) == 0.0 and float(m2["alpha"]) == pytest.approx(0.2)  # ramp over 2 steps
    assert all(np.isfinite(float(m[k])) for m in (m1, m2) for k in ("loss", "loss_itc", "loss_itm"))

    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(2, state, force=True)
    restored, _ = ckpt.restore(2, state)
    ckpt.close()
    for a, b in zip(jax.tree_util.tree_leaves((state.momentum, state.queues)),
                    jax.tree_util.tree_leaves((restored.momentum, restored.queues))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
