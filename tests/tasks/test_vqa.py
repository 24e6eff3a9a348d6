"""Answer ranking on a fake decoder whose likelihoods are known."""

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
