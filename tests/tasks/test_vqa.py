"""Answer ranking on a fake decoder whose likelihoods are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.tasks.vqa import answer_log_likelihood, rank_answers

DEC, SEP, V = 1, 2, 6
ANSWERS = np.array([[DEC, 3, SEP], [DEC, 4, SEP], [DEC, 5, SEP]])  # one-word answers "a", "b", "c"
# Per question: p(first word | [DEC]) and p([SEP] | word) for the words 3, 4, 5.
FIRST = {0: [0.5, 0.3, 0.2], 1: [0.1, 0.5, 0.4]}
END = {0: [0.1, 0.9, 0.9], 1: [0.999, 0.1, 0.2]}
# Full likelihoods: question 0 -> (.05, .27, .18); question 1 -> (.0999, .05, .08).


def _table() -> np.ndarray:
    """log p(next | question, current token), rows summing to one (the rest on token 0)."""
    p = np.full((2, V, V), 1e-9)
    for q in (0, 1):
        p[q, DEC, 3:6] = FIRST[q]
        for j, word in enumerate((3, 4, 5)):
            p[q, word, SEP] = END[q][j]
    p[:, :, 0] += np.maximum(1.0 - p.sum(-1), 0.0)
    return np.log(p / p.sum(-1, keepdims=True))


def fake_decode(ids, mask, states, states_mask):
    """Logits from the table: the question id is the first feature of the question states."""
    q = states[:, 0, 0].astype(jnp.int32)
    return jnp.asarray(_table(), jnp.float32)[q[:, None], ids]


def _rank(k):
    states = jnp.zeros((2, 3, 4)).at[1, 0, 0].set(1.0)
    return rank_answers(fake_decode, states, jnp.ones((2, 3), jnp.int32), jnp.asarray(ANSWERS),
                        jnp.ones_like(jnp.asarray(ANSWERS)), k).tolist()


def test_answer_log_likelihood_is_known():
    ids = jnp.asarray(ANSWERS)
    states = jnp.zeros((3, 3, 4))
    ll = answer_log_likelihood(fake_decode(ids, None, states, None), ids, jnp.ones_like(ids))
    np.testing.assert_allclose(np.exp(ll), [0.05, 0.27, 0.18], rtol=1e-4)


@pytest.mark.parametrize(("k", "expected"), [
    (1, [0, 1]),  # first-token probability alone
    (2, [1, 2]),  # q0: "b" re-ranked over "a"; q1: the best overall ("a") is not among the 2 first candidates
    (3, [1, 0]),  # every answer re-ranked by its full likelihood
])
def test_rank_answers_top_k_then_likelihood(k, expected):
    assert _rank(k) == expected


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])  # Aurora's CP/med.py (none); Salesforce BLIP's med.py
def test_vqa_loss_label_smoothing_by_hand(smoothing):
    """One question, two answers weighted 0.75 / 0.25; each answer's loss sums its tokens' (smoothed) NLL."""
    from aurora_jax.models.blip import Blip
    from aurora_jax.tasks.vqa import vqa_loss
    from aurora_jax.train.config import base_config
    from aurora_jax.train.recipes.blip import task_loss_fn
    from tests.fixtures import tiny_blip_config

    logits = np.random.default_rng(0).standard_normal((2, 3, V)).astype(np.float32)
    ids = np.array([[DEC, 3, SEP], [DEC, 4, 0]])  # the second answer is one token shorter (padding)
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    weights = np.array([0.75, 0.25], np.float32)
    logp = _np_log_softmax(logits.astype(np.float64))
    # Targets: answer 0 -> (3, SEP) at positions 0, 1; answer 1 -> (4) at position 0 (the pad is ignored).
    targets = [[(0, 3), (1, SEP)], [(0, 4)]]
    per_answer = [sum(-(1 - smoothing) * logp[r, t, y] - smoothing * logp[r, t].mean() for t, y in tok)
                  for r, tok in enumerate(targets)]
    want = float(np.dot(weights, per_answer))  # divided by the one question
    got = vqa_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(weights), 1, smoothing)
    assert float(got) == pytest.approx(want, rel=1e-5)

    # The recipe reads loss.label_smoothing (configs/vqa.py sets the release's 0.0).
    c = base_config()
    c.task = "vqa"
    c.loss.label_smoothing = smoothing
    cfg = tiny_blip_config("vqa")

    decoded = []

    def fwd(method, *args):
        if method is Blip.decode:
            decoded.append(np.asarray(args[0]))
            return jnp.asarray(logits)
        return jnp.zeros((1, 3, 4))  # image tokens / question states: the fake decoder ignores them

    tokenized = ids.copy()
    tokenized[:, 0] = 5  # the tokenizer's [CLS]: the loss must decode from [DEC], as evaluation does
    batch = {"image": np.zeros((1, 8, 8, 3), np.float32), "question_ids": np.ones((1, 3), np.int32),
             "question_mask": np.ones((1, 3), np.int32), "answer_ids": tokenized[None], "answer_mask": mask[None],
             "answer_weights": weights[None]}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, _ = task_loss_fn(c, cfg, None)(fwd, batch, jax.random.key(0), {})
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert decoded[0][:, 0].tolist() == [cfg.bos_token_id] * 2 and decoded[0][:, 1:].tolist() == ids[:, 1:].tolist()
