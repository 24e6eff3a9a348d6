"""Hand-made cases for retrieval: R@K, ITM re-ranking, ITC loss, hard negatives, temperature, distillation targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.tasks.retrieval import (
    TEMP_RANGE,
    clamp_temp,
    hard_negative_weights,
    hard_negatives,
    itc_loss,
    momentum_itc,
    positive_mask,
    queue_targets,
    recall_at_k,
    rerank_top_k,
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
    step = jax.jit(make_train_step(Blip(cfg), peft_cfg, tx, task_loss_fn(base_config(), cfg, peft_cfg)))
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
