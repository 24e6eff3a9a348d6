"""The video path (frame-aware cross-attention, video ITC, video ITM with its negatives) against an independent
float64 PyTorch restatement of the release (tests/tasks/video_torch_reference.py), float32, 1e-5 relative."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.models.bert import frame_weights
from aurora_jax.models.blip import Blip
from aurora_jax.peft import PeftConfig, informative_context, init_adapter, tuned_apply, tuned_forward
from aurora_jax.tasks import video
from aurora_jax.tasks.momentum import init_queues
from aurora_jax.tasks.retrieval import hard_negatives, positive_mask
from tests.fixtures import RANK, TINY_RETRIEVAL, fast_init, max_rel_err, trained_adapter

torch = pytest.importorskip("torch")
from tests.tasks import video_torch_reference as vref  # noqa: E402

TOL = 1e-5
MODEL = Blip(TINY_RETRIEVAL)  # 32 px, patch 16: 5 tokens per frame
B, T, N = 3, 4, 5
ENC = 5  # an [ENC] id inside the tiny vocabulary
CFG = PeftConfig(rank=RANK)


@pytest.fixture(scope="module")
def tiny():
    params = fast_init(TINY_RETRIEVAL, 0)
    adapter = trained_adapter(init_adapter(params, CFG, jax.random.key(2)), 2)
    rng = np.random.default_rng(0)
    clips = rng.normal(size=(B, T, 32, 32, 3)).astype(np.float32)
    ids = np.array([[1, 7, 9, 11, 13, 2], [1, 3, 4, 2, 0, 0], [1, 8, 6, 10, 2, 0]], np.int32)
    batch = {"video": jnp.asarray(clips), "text_ids": jnp.asarray(ids), "text_mask": jnp.asarray((ids > 0) * 1),
             "image_index": jnp.arange(B, dtype=jnp.int32)}
    return params, adapter, batch, vref.RefVideoBlip(params, adapter, TINY_RETRIEVAL)


def _np(x):
    return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


def test_frame_aware_cross_attention(tiny):
    """Keys of every token but each frame's first scaled by T * softmax(sim / 4), after the Aurora key delta."""
    params, adapter, batch, ref = tiny
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.normal(size=(B, T * N, 32)), jnp.float32)
    sim = jnp.asarray(rng.uniform(-1, 1, size=(B, T)) * 4, jnp.float32)
    ids, mask = batch["text_ids"], batch["text_mask"]
    run = partial(tuned_apply, MODEL, params, adapter, CFG, ids, mask, tokens, method=Blip.encode_multimodal)
    got, off = run(frame_sim=sim), run()
    want = ref.text(np.asarray(ids), np.asarray(mask), vref.t(tokens), vref.t(sim))
    assert max_rel_err(got, _np(want)) < TOL
    assert max_rel_err(off, _np(want)) > 1e-3  # the weights change the output
    assert max_rel_err(off, _np(ref.text(np.asarray(ids), np.asarray(mask), vref.t(tokens)))) < TOL
    # equal similarities give weight exactly 1 (T = 4): the same numbers as without frame-aware attention
    np.testing.assert_array_equal(run(frame_sim=jnp.zeros((B, T))), off)
    # the weights are a constant for the gradient, as the release computes them under no_grad
    grad = jax.grad(lambda s: jnp.sum(run(frame_sim=s)))(sim)
    assert not np.any(np.asarray(grad))
    np.testing.assert_allclose(frame_weights(sim).sum(-1), T, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot be split"):
        run(frame_sim=jnp.zeros((B, 3)))


def test_video_itc_and_itm_match_the_release(tiny):
    """video_retrieval_loss: ITC on the mean frame [CLS], ITM on [pos; (text, neg clip); (neg text, clip)]."""
    params, adapter, batch, ref = tiny
    temp, key = 0.07, jax.random.key(3)
    fwd = tuned_forward(MODEL, params, adapter, CFG)
    ice = partial(informative_context, weight=0.1)
    loss, m = video.video_retrieval_loss(fwd, batch, key, temp=temp, enc_token_id=ENC, ice=ice)

    tokens, clip, frame, text, text_cls, loss_itc = ref.itc(vref.t(batch["video"]), np.asarray(batch["text_ids"]),
                                                           np.asarray(batch["text_mask"]), temp)
    frame_tokens = video.encode_frames(fwd, batch["video"])
    assert frame_tokens.shape == (B, T, N, 32)
    assert max_rel_err(frame_tokens, _np(tokens)) < TOL
    assert max_rel_err(video.video_feat(fwd, frame_tokens), _np(clip)) < TOL
    assert max_rel_err(video.frame_feat(fwd, frame_tokens), _np(frame)) < TOL
    assert abs(float(m["loss_itc"]) - float(loss_itc)) / float(loss_itc) < TOL

    # the same negatives as the loss drew (hard_negatives is deterministic in its key)
    sim = _np(clip @ text.T / temp).astype(np.float32)
    neg_text, neg_video = hard_negatives(key, jnp.asarray(sim), jnp.asarray(sim.T), positive_mask(
        batch["image_index"], batch["image_index"]))
    neg_text, neg_video = np.asarray(neg_text), np.asarray(neg_video)
    assert not np.any(neg_text == np.arange(B)) and not np.any(neg_video == np.arange(B))
    ids, mask = np.asarray(batch["text_ids"]), np.asarray(batch["text_mask"])
    neg = (torch.as_tensor(neg_text), torch.as_tensor(neg_video))
    want = ref.itm_logits(tokens, frame, text, text_cls, ids, mask, *neg, ENC)
    labels = np.r_[np.ones(B), np.zeros(2 * B)].astype(int)
    want_loss = float(torch.nn.functional.cross_entropy(want, torch.as_tensor(labels)))
    assert abs(float(m["loss_itm"]) - want_loss) / want_loss < TOL
    assert float(loss) == pytest.approx(float(m["loss_itc"]) + float(m["loss_itm"]), rel=1e-6)

    # The ITM forward with fixed negatives, on frame and text features far apart (a random tiny ViT gives nearly
    # equal frames, i.e. weights near 1), so that a wrong pairing of negatives with frame weights shows.
    rng = np.random.default_rng(4)
    frames_far = rng.normal(size=(B, T, 16)) * 3
    text_far = rng.normal(size=(B, 16)) * 3
    got = video.video_itm_logits(fwd, batch, frame_tokens, jnp.asarray(frames_far, jnp.float32),
                                 jnp.asarray(text_far, jnp.float32), jnp.asarray(_np(text_cls), jnp.float32),
                                 jnp.asarray(neg_text), jnp.asarray(neg_video), enc_token_id=ENC, ice=ice)
    want = ref.itm_logits(tokens, vref.t(frames_far), vref.t(text_far), text_cls, ids, mask, *neg, ENC)
    assert got.shape == (3 * B, 2)
    assert max_rel_err(got, _np(want)) < TOL
    plain = ref.itm_logits(tokens, vref.t(frames_far), vref.t(text_far), text_cls, ids, mask, *neg, ENC,
                           frame_aware=False)
    assert max_rel_err(_np(plain), _np(want)) > 1e-3  # 100 x TOL
    swapped = ref.itm_logits(tokens, vref.t(frames_far), vref.t(text_far), text_cls, ids, mask, *neg[::-1], ENC)
    assert max_rel_err(_np(swapped), _np(want)) > 1e-3
    no_frames = video.video_itm_logits(fwd, batch, frame_tokens, jnp.asarray(frames_far, jnp.float32),
                                       jnp.asarray(text_far, jnp.float32), jnp.asarray(_np(text_cls), jnp.float32),
                                       jnp.asarray(neg_text), jnp.asarray(neg_video), enc_token_id=ENC, ice=ice,
                                       frame_aware=False)
    assert max_rel_err(no_frames, _np(plain)) < TOL


def test_momentum_distilled_video_itc(tiny):
    """With momentum distillation: the momentum clip features (mean frame [CLS]) go into the queue, and with
    alpha = 0 and a teacher equal to the online model the ITC equals plain video ITC over [batch; queue]."""
    params, adapter, batch, _ = tiny
    fwd = tuned_forward(MODEL, params, adapter, CFG)
    queues = init_queues(jax.random.key(0), 2 * B, 16)
    loss, (m, after) = video.video_retrieval_loss_distilled(fwd, fwd, batch, jax.random.key(3), queues, alpha=0.0,
                                                            temp=0.07, enc_token_id=ENC)
    feat = video.video_feat(fwd, video.encode_frames(fwd, batch["video"]))
    np.testing.assert_allclose(after["image_feat"][:B], feat, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(after["idx"][:B], batch["image_index"])
    assert int(after["ptr"]) == B
    text = fwd(Blip.text_feat, fwd(Blip.encode_text, batch["text_ids"], batch["text_mask"]))
    sim = feat @ jnp.concatenate([text, queues["text_feat"]]).T / 0.07
    sim_t = text @ jnp.concatenate([feat, queues["image_feat"]]).T / 0.07
    want = (-jax.nn.log_softmax(sim, 1)[jnp.arange(B), jnp.arange(B)].mean()
            - jax.nn.log_softmax(sim_t, 1)[jnp.arange(B), jnp.arange(B)].mean()) / 2
    assert float(m["loss_itc"]) == pytest.approx(float(want), rel=1e-5)
    assert np.isfinite(float(loss)) and 0.0 <= float(m["itm_acc"]) <= 1.0
