"""Hand-made cases for retrieval: R@K, ITM re-ranking, ITC loss, hard negatives, temperature, distillation targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.peft import PeftConfig
from aurora_jax.peft.ice import informative_context
from aurora_jax.tasks.retrieval import (
    TEMP_RANGE,
    Pools,
    clamp_temp,
    hard_negative_logits,
    hard_negative_weights,
    hard_negatives,
    itc_loss,
    momentum_itc,
    positive_mask,
    queue_targets,
    recall_at_k,
    rerank_top_k,
    retrieval_loss,
    same_shard,
    soft_targets,
)


def _scores_with_ranks(n_cols: int, targets: list[list[int]], ranks: list[int]) -> np.ndarray:
    """Rows whose best target column sits at a given rank (targets kept together from that rank on)."""
    rows = []
    for tgt, rank in zip(targets, ranks):
        others = [c for c in range(n_cols) if c not in tgt]
        order = others[:rank] + list(tgt) + others[rank:]
        row = np.empty(n_cols, np.float32)
        row[order] = np.linspace(1.0, 0.0, n_cols)
        rows.append(row)
    return np.stack(rows)


def test_recall_at_k_known_ranks():
    img2txt = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9, 10], [11]]  # several captions per image
    txt2img = [i for i, caps in enumerate(img2txt) for _ in caps]
    i2t = _scores_with_ranks(12, img2txt, [0, 3, 7, 11])  # TR ranks -> R@1 25, R@5 50, R@10 75
    ir_ranks = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # 5/12 at rank 0, all within 4 images
    t2i = _scores_with_ranks(4, [[g] for g in txt2img], ir_ranks)
    out = recall_at_k(i2t, t2i, img2txt, txt2img)
    assert (out["txt_r1"], out["txt_r5"], out["txt_r10"]) == (25.0, 50.0, 75.0)
    assert out["img_r1"] == pytest.approx(100 * 5 / 12)
    assert out["img_r5"] == out["img_r10"] == 100.0
    assert out["txt_r_mean"] == pytest.approx(50.0)
    assert out["img_r_mean"] == pytest.approx((100 * 5 / 12 + 200) / 3)
    assert out["r_mean"] == pytest.approx((out["txt_r_mean"] + out["img_r_mean"]) / 2)


def test_recall_counts_any_caption_of_the_image():
    # Image 0's second caption is ranked first, its first caption last: still a hit at R@1.
    i2t = np.array([[0.1, 0.9, 0.5]], np.float32)
    out = recall_at_k(i2t, np.zeros((3, 1), np.float32), [[0, 1, 2]], [0, 0, 0], ks=(1,))
    assert out["txt_r1"] == 100.0 and out["img_r1"] == 100.0


@pytest.mark.parametrize("sim_weight", [0.0, 0.5, 1.0])  # 0: the release's image retrieval (beta = 0)
def test_rerank_top_k_scores_only_the_k_best(sim_weight):
    sims = np.array([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.4, 0.6]], np.float32)
    calls = []

    def score_pairs(row, cols):
        calls.append((row, list(cols)))
        return 10.0 * (row + 1) + np.asarray(cols, np.float32)  # a known ITM score per pair

    out = rerank_top_k(sims, 2, score_pairs, sim_weight)
    assert calls == [(0, [1, 2]), (1, [0, 3])]  # the k most similar, best first
    expected = np.full((2, 4), -100.0, np.float32)
    expected[0, [1, 2]] = [11.0 + sim_weight * 0.9, 12.0 + sim_weight * 0.5]
    expected[1, [0, 3]] = [20.0 + sim_weight * 0.8, 23.0 + sim_weight * 0.6]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert (rerank_top_k(sims, 10, lambda r, c: np.zeros(len(c))) > -100).all()  # k larger than the columns


def test_itc_loss_hand_values():
    sim = jnp.array([[2.0, 0.0], [1.0, 1.0]])
    eye = jnp.eye(2)
    lse = np.log(np.exp(2.0) + 1.0)
    i2t = ((lse - 2.0) + np.log(2.0)) / 2  # rows: -log softmax at the diagonal
    t2i_rows = sim.T
    t2i = ((np.log(np.exp(2.0) + np.e) - 2.0) + (np.log(1.0 + np.e) - 1.0)) / 2
    assert float(itc_loss(sim, t2i_rows, eye, eye)) == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # Two captions of one image share the target mass.
    pos = positive_mask(jnp.array([0, 0, 1]), jnp.array([0, 0, 1]))
    np.testing.assert_allclose(soft_targets(pos), [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    uniform = jnp.zeros((3, 3))
    assert float(itc_loss(uniform, uniform, soft_targets(pos), soft_targets(pos))) == pytest.approx(np.log(3.0))


def test_hard_negatives_never_draw_positives():
    idx = jnp.array([0, 0, 1, 2, 2, 3])
    pos = positive_mask(idx, idx)
    keys = jax.random.split(jax.random.key(0), 500)
    rows = jnp.arange(6)
    # Positives most similar by far (negatives' softmax ~1e-9: drawn in log space, nothing underflows), then a
    # hard negative each for row 2 (text 5) and column 0 (image 3).
    for sim in (jnp.where(pos, 20.0, 0.0), jnp.where(pos, 5.0, 0.0).at[2, 5].set(8.0).at[3, 0].set(8.0)):
        neg_text, neg_image = jax.vmap(lambda k, s=sim: hard_negatives(k, s, s.T, pos))(keys)
        assert not bool(jnp.any(pos[rows, neg_text]))  # neg text j for image i: never the same image
        assert not bool(jnp.any(pos.T[rows, neg_image]))
    assert float(jnp.mean(neg_text[:, 2] == 5)) > 0.9  # hard: sampled by similarity
    assert float(jnp.mean(neg_image[:, 0] == 3)) > 0.9


@pytest.mark.parametrize("eps", [0.0, 1e-4])  # the release's fine-tuning rule; BLIP's pre-training rule
def test_hard_negative_weights_hand_values(eps):
    sim = jnp.array([[1.0, 2.0, 0.0], [0.5, 0.5, 3.0]])
    pos = jnp.array([[True, False, False], [False, True, True]])
    e = np.exp(np.array([[1.0, 2.0, 0.0], [0.5, 0.5, 3.0]]))
    soft = e / e.sum(1, keepdims=True)
    expected = np.array([[0.0, soft[0, 1] + eps, soft[0, 2] + eps], [soft[1, 0] + eps, 0.0, 0.0]])
    np.testing.assert_allclose(hard_negative_weights(sim, pos, eps), expected, rtol=1e-6)
    # The draws follow the normalised weights (row 0: 1 vs 2 in proportion e^2 : e^0; row 1: always column 0).
    keys = jax.random.split(jax.random.key(1), 4000)
    neg_text, _ = jax.vmap(lambda k: hard_negatives(k, sim, sim.T, pos, eps))(keys)
    p1 = expected[0, 1] / expected[0].sum()
    assert float(jnp.mean(neg_text[:, 0] == 1)) == pytest.approx(p1, abs=0.02)
    assert bool(jnp.all(neg_text[:, 1] == 0))


def test_clamp_temp_value_and_straight_through_gradient():
    lo, hi = TEMP_RANGE
    assert (lo, hi) == (0.001, 0.5)
    for t, want in ((0.07, 0.07), (0.9, hi), (1e-5, lo)):
        assert float(clamp_temp(t)) == pytest.approx(want, rel=1e-6)
    # d/dt (3 / clamp(t)) at t = 0.9: the release differentiates at the clamped value, -3 / 0.5^2.
    assert float(jax.grad(lambda t: 3.0 / clamp_temp(t))(0.9)) == pytest.approx(-3.0 / hi**2, rel=1e-6)
    assert float(jax.grad(lambda t: 3.0 / clamp_temp(t))(0.07)) == pytest.approx(-3.0 / 0.07**2, rel=1e-5)


def test_queue_targets_count_queue_entries_of_the_same_image():
    t = queue_targets(jnp.array([0, 1]), jnp.array([1, -100, 0]))
    np.testing.assert_allclose(t, [[0.5, 0, 0, 0, 0.5], [0, 0.5, 0.5, 0, 0]])


def _np_itc(img, txt, img_m, txt_m, idx, q, temp, alpha):
    """numpy restatement of momentum-distilled ITC over [momentum batch; queue]."""
    def log_softmax(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    img_all, txt_all = np.concatenate([img_m, q["image_feat"]]), np.concatenate([txt_m, q["text_feat"]])
    pos = (idx[:, None] == np.concatenate([idx, q["idx"]])[None]).astype(np.float64)
    hard = pos / pos.sum(1, keepdims=True)
    t_i2t = alpha * np.exp(log_softmax(img_m @ txt_all.T / temp)) + (1 - alpha) * hard
    t_t2i = alpha * np.exp(log_softmax(txt_m @ img_all.T / temp)) + (1 - alpha) * hard
    li2t = -(log_softmax(img @ txt_all.T / temp) * t_i2t).sum(1).mean()
    lt2i = -(log_softmax(txt @ img_all.T / temp) * t_t2i).sum(1).mean()
    return (li2t + lt2i) / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_momentum_itc_matches_the_formula(alpha):
    rng = np.random.default_rng(0)
    unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(rng.standard_normal(s))
    img, txt, img_m, txt_m = (unit(3, 4) for _ in range(4))
    q = {"image_feat": unit(6, 4), "text_feat": unit(6, 4), "idx": np.array([2, -100, 0, 5, 0, -100])}
    idx = np.array([0, 1, 2])
    got = momentum_itc(*(jnp.asarray(x, jnp.float32) for x in (img, txt, img_m, txt_m)), jnp.asarray(idx),
                       {k: jnp.asarray(v) for k, v in q.items()}, temp=0.07, alpha=alpha)
    assert float(got) == pytest.approx(_np_itc(img, txt, img_m, txt_m, idx, q, 0.07, alpha), rel=1e-5)


def test_trained_temperature_reaches_the_optimizer_and_is_clamped_in_the_loss():
    """peft.train_temp: temp is in what trains and moves; outside [0.001, 0.5] the loss sees the bound."""
    import dataclasses

    from aurora_jax.models.blip import Blip
    from aurora_jax.parallel.mesh import make_mesh
    from aurora_jax.peft import PeftConfig
    from aurora_jax.train.config import base_config
    from aurora_jax.train.optim import make_optimizer
    from aurora_jax.train.recipes.blip import init_train_state, task_loss_fn
    from aurora_jax.train.state import make_train_step
    from tests.fixtures import fast_init, tiny_blip_config

    cfg = tiny_blip_config("retrieval")
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=1),
                      text=dataclasses.replace(cfg.text, num_layers=1))
    peft_cfg = PeftConfig(method="aurora", rank=4, dropout=0.0, train_temp=True)
    tx = make_optimizer(lambda step: 1e-2, weight_decay=0.0)
    config = base_config()
    config.mesh = (1, 1, 1)  # the mesh the step runs on: one shard of the batch
    step = jax.jit(make_train_step(Blip(cfg), peft_cfg, tx, task_loss_fn(config, cfg, peft_cfg)))
    rng = np.random.default_rng(0)
    s = cfg.vision.image_size
    ids = rng.integers(4, 90, size=(4, 8)).astype(np.int32)
    batch = {"image": rng.standard_normal((4, s, s, 3)).astype(np.float32), "text_ids": ids,
             "text_mask": np.ones((4, 8), np.int32), "image_index": np.array([0, 1, 2, 3], np.int32)}

    def one_step(temp):
        base = fast_init(cfg, 0)
        base["temp"] = jnp.float32(temp)
        state, frozen, _ = init_train_state(cfg, base, peft_cfg, tx, make_mesh((1, 1, 1)), seed=0)
        assert "temp" in state.trainable["base"] and "temp" not in frozen
        new, metrics = step(state, frozen, batch)
        return float(state.trainable["base"]["temp"]), float(new.trainable["base"]["temp"]), float(metrics["loss"])

    before, after, loss_in = one_step(0.07)
    assert before == pytest.approx(0.07) and after != pytest.approx(0.07, abs=1e-4)  # Adam's first step ~ lr
    _, after_hi, loss_hi = one_step(0.9)  # above the range: the forward uses 0.5 ...
    _, _, loss_bound = one_step(0.5)
    assert loss_hi == pytest.approx(loss_bound, rel=1e-6)
    assert loss_hi != pytest.approx(loss_in, rel=1e-3)
    assert after_hi != pytest.approx(0.9, abs=1e-4)  # ... and the gradient still reaches the parameter


# ------------------------------------------------------------------ per-GPU pools (negative_all_rank etc.)


def _unit(rng, n, d=6):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_same_shard_is_the_block_diagonal_of_the_batch_layout():
    got = np.asarray(same_shard(6, 3))
    assert got.tolist() == [[r // 2 == c // 2 for c in range(6)] for r in range(6)]
    assert same_shard(6, 1) is None
    with pytest.raises(ValueError, match="multiple of the 4"):
        same_shard(6, 4)


def test_local_hard_negatives_are_the_per_shard_softmax():
    """negative_all_rank False: each row draws from its own shard's rows with that shard's softmax, positives out."""
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((8, 8)).astype(np.float32) * 3
    idx = np.array([0, 0, 1, 2, 3, 3, 4, 5])
    pos = positive_mask(jnp.asarray(idx), jnp.asarray(idx))
    pools = Pools(shards=2, negative_all_rank=False)
    got = jax.nn.softmax(hard_negative_logits(jnp.asarray(sim), pos, pool=pools.negatives(8)), axis=1)
    for r in range(8):  # the release's rule on the row's own shard alone
        lo = 4 * (r // 4)
        w = np.exp(sim[r, lo:lo + 4] - sim[r, lo:lo + 4].max())
        w /= w.sum()
        w[idx[lo:lo + 4] == idx[r]] = 0
        want = np.zeros(8)
        want[lo:lo + 4] = w / w.sum()
        np.testing.assert_allclose(np.asarray(got[r]), want, rtol=1e-5, atol=1e-7)
    neg_t, neg_i = hard_negatives(jax.random.key(1), jnp.asarray(sim), jnp.asarray(sim.T), pos,
                                  pool=pools.negatives(8))
    rows = np.arange(8)
    assert (np.asarray(neg_t) // 4 == rows // 4).all() and (np.asarray(neg_i) // 4 == rows // 4).all()
    assert (idx[np.asarray(neg_t)] != idx).all() and (idx[np.asarray(neg_i)] != idx).all()
    # all rank: the same call draws across shards
    draws = [hard_negatives(jax.random.key(k), jnp.asarray(sim), jnp.asarray(sim.T), pos)[0] for k in range(20)]
    assert any((np.asarray(d) // 4 != rows // 4).any() for d in draws)


def test_ice_mean_per_shard():
    rng = np.random.default_rng(1)
    pos_cls, text_cls = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    got = Pools(shards=3, in_batch_all_rank=False).ice(informative_context, jnp.asarray(pos_cls), jnp.asarray(text_cls))
    want = np.concatenate([pos_cls[s:s + 2] + 0.1 * text_cls[s:s + 2].mean(0) for s in (0, 2, 4)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    glob = Pools(shards=3).ice(informative_context, jnp.asarray(pos_cls), jnp.asarray(text_cls))
    np.testing.assert_allclose(np.asarray(glob), pos_cls + 0.1 * text_cls.mean(0), rtol=1e-6)


def test_local_momentum_itc_is_the_mean_of_the_per_gpu_losses():
    """The release: each GPU contrasts its own batch with [its momentum batch; the shared queue]; DDP averages."""
    rng = np.random.default_rng(2)
    b, q = 6, 4
    feats = [jnp.asarray(_unit(rng, b)) for _ in range(4)]
    idx = jnp.asarray([0, 1, 1, 2, 3, 0])
    queues = {"image_feat": jnp.asarray(_unit(rng, q)), "text_feat": jnp.asarray(_unit(rng, q)),
              "idx": jnp.asarray([1, 5, 6, 0])}
    got = momentum_itc(*feats, idx, queues, temp=0.07, alpha=0.4, in_batch=same_shard(b, 2))
    per_gpu = [momentum_itc(*(f[s:s + 3] for f in feats), idx[s:s + 3], queues, temp=0.07, alpha=0.4)
               for s in (0, 3)]
    np.testing.assert_allclose(float(got), float(np.mean(per_gpu)), rtol=1e-5)
    assert abs(float(got) - float(momentum_itc(*feats, idx, queues, temp=0.07, alpha=0.4))) > 1e-3


def test_local_in_batch_itc_of_the_retrieval_loss(tiny_retrieval):
    """retrieval_loss's ITC with per-shard pools equals the mean of the ITC of each shard's rows alone."""
    fwd, batch = tiny_retrieval
    itc = jax.jit(lambda b, pools: retrieval_loss(fwd, b, jax.random.key(0), temp=0.07, enc_token_id=3,
                                                  pools=pools)[1]["loss_itc"], static_argnums=1)
    m = {"loss_itc": itc(batch, Pools(shards=2, in_batch_all_rank=False, negative_all_rank=False))}
    halves = [itc({k: v[s:s + 2] for k, v in batch.items()}, Pools()) for s in (0, 2)]
    np.testing.assert_allclose(float(m["loss_itc"]), float(np.mean(halves)), rtol=1e-5)
    m_all = {"loss_itc": itc(batch, Pools())}
    assert abs(float(m_all["loss_itc"]) - float(m["loss_itc"])) > 1e-4


@pytest.fixture(scope="module")
def tiny_retrieval():
    import dataclasses

    from aurora_jax.models.blip import Blip
    from aurora_jax.peft import tuned_forward
    from tests.fixtures import fast_init, tiny_blip_config

    cfg = tiny_blip_config("retrieval")
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_layers=1),
                      text=dataclasses.replace(cfg.text, num_layers=1))
    params = fast_init(cfg, 0)
    fwd = tuned_forward(Blip(cfg), params, {}, PeftConfig(method="frozen"))
    rng = np.random.default_rng(0)
    s = cfg.vision.image_size
    ids = rng.integers(4, 90, size=(4, 8)).astype(np.int32)
    batch = {"image": jnp.asarray(rng.standard_normal((4, s, s, 3)), jnp.float32), "text_ids": jnp.asarray(ids),
             "text_mask": jnp.ones((4, 8), jnp.int32), "image_index": jnp.asarray([0, 1, 2, 2])}
    return fwd, batch


def test_a_shard_without_negatives_draws_from_the_whole_batch():
    idx = jnp.asarray([0, 0, 1, 2])  # shard 0 holds two captions of image 0: no negative in it
    pos = positive_mask(idx, idx)
    sim = jnp.zeros((4, 4))
    for k in range(5):
        neg_t, _ = hard_negatives(jax.random.key(k), sim, sim, pos, pool=same_shard(4, 2))
        assert set(np.asarray(neg_t[:2]).tolist()) <= {2, 3} and set(np.asarray(neg_t[2:]).tolist()) <= {2, 3}
        assert np.asarray(neg_t)[2] == 3 and np.asarray(neg_t)[3] == 2
