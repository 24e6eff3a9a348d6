"""mPLUG-Owl / Owl2 conversation templates, answer-only labels, truncation and the LM loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aurora_jax.tasks import instruct

K = 7  # visual tokens per image


def _tok(text: str) -> list[int]:
    return [ord(c) for c in text]


def _show(ids, labels=None) -> str:
    ids = (
        ids
        if labels is None
        else [i for i, lab in zip(ids, labels, strict=True) if lab != instruct.IGNORE_INDEX]
    )
    out, prev_img = "", False
    for i in ids:
        if i < 0:
            out += "" if prev_img else "[IMG]"
        else:
            out += "</s>" if i == 2 else chr(i)
        prev_img = i < 0
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_templates_and_answer_only_labels(version):
    segs = instruct.render(version, [("What is it?", "A cat."), ("Color?", "Black.")])
    ex = instruct.encode(segs, _tok, version=version, bos_id=None, eos_id=2, tokens_per_image=K)
    text = _show(ex.input_ids)
    if version == 1:
        assert text == (
            instruct.V1_SYSTEM + "\nHuman: [IMG]\nHuman: What is it?\nAI: A cat.</s>"
            "\nHuman: Color?\nAI: Black.</s>"
        )
    else:
        assert text == (
            instruct.V2_SYSTEM + " USER: [IMG]What is it? ASSISTANT: A cat.</s>"
            "USER: Color? ASSISTANT: Black.</s>"
        )
    assert _show(ex.input_ids, ex.labels) == " A cat.</s> Black.</s>"
    assert (ex.modality == (ex.input_ids < 0)).all() and ex.modality.sum() == K
    assert (ex.input_ids[ex.input_ids < 0] == instruct.IMAGE_PLACEHOLDER_ID[version]).all()
    prompt = instruct.encode(
        instruct.render(version, [("Hi", None)], num_images=2),
        _tok,
        version=version,
        bos_id=1,
        eos_id=2,
        tokens_per_image=K,
    )
    assert prompt.input_ids[0] == 1 and (prompt.labels == instruct.IGNORE_INDEX).all()
    assert prompt.modality.sum() == 2 * K
    assert _show(prompt.input_ids[1:]).endswith("AI:" if version == 1 else "Hi ASSISTANT:")


def test_encode_truncation_and_marker_count():
    segs = instruct.render(2, [("<|image|>Q", "A")])
    ex = instruct.encode(segs, _tok, version=2, bos_id=None, eos_id=2, tokens_per_image=K)
    assert ex.modality.sum() == K
    n_sys = len(instruct.V2_SYSTEM + " USER: ")
    with pytest.raises(ValueError, match="cut through"):
        instruct.encode(segs, _tok, version=2, bos_id=None, eos_id=2, tokens_per_image=K, max_len=n_sys + 3)
    short = instruct.encode(
        segs, _tok, version=2, bos_id=None, eos_id=2, tokens_per_image=K, max_len=n_sys + K + 2
    )
    assert len(short.input_ids) == n_sys + K + 2
    with pytest.raises(ValueError, match="image markers"):
        instruct.render(2, [("<|image|>Q", "A")], num_images=2)


def test_lm_loss_matches_torch_cross_entropy():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 7, 11).astype(np.float32)
    labels = rng.randint(0, 11, (2, 7))
    labels[0, :3] = instruct.IGNORE_INDEX
    labels[1, 5:] = instruct.IGNORE_INDEX
    loss, count = instruct.lm_loss(jnp.asarray(logits), jnp.asarray(labels))
    want = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:, :-1]).reshape(-1, 11),
        torch.tensor(labels[:, 1:]).reshape(-1),
        ignore_index=-100,
    )
    assert abs(float(loss) - float(want)) < 1e-6
    assert int(count) == int((labels[:, 1:] != -100).sum())
    # Differentiable end to end.
    g = jax.grad(lambda x: instruct.lm_loss(x, jnp.asarray(labels))[0])(jnp.asarray(logits))
    assert np.isfinite(np.asarray(g)).all()
