"""Aurora on tiny BLIP vs an independent float64 PyTorch restatement of the release's equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.models.blip import Blip
from aurora_jax.peft import (
    PeftConfig,
    init_adapter,
    mode_approx_delta,
    mode_approx_delta_text,
    mode_approx_fc1_delta,
    mode_approx_fc2_delta,
    tuned_apply,
)
from tests.fixtures import RANK, TINY_RETRIEVAL, TINY_VQA, blip_inputs, max_rel_err, trained_adapter

torch = pytest.importorskip("torch")
from tests.peft import torch_reference as ref  # noqa: E402

TOL = 1e-5
MODEL = Blip(TINY_RETRIEVAL)


def _np(x):
    return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


@pytest.fixture(scope="module")
def image_embeds(retrieval_params, retrieval_adapter, aurora_cfg):
    pixels, _, _ = blip_inputs()
    return tuned_apply(MODEL, retrieval_params, retrieval_adapter, aurora_cfg, pixels,
                       method=Blip.encode_image)


@pytest.mark.parametrize("core", ["dense", "diagonal"])
def test_vit_blocks(retrieval_params, core):
    """encode_image: fused qkv deltas, proj delta, fc1/fc2 with the literal row-major reshapes."""
    cfg = PeftConfig(rank=RANK, core=core)
    adapter = trained_adapter(init_adapter(retrieval_params, cfg, jax.random.key(5)), 5)
    if core == "diagonal":  # move the core off its all-ones init so its values are tested too
        adapter["shared"]["C"] = adapter["shared"]["C"] + jnp.linspace(-0.5, 0.5, RANK)
    pixels, _, _ = blip_inputs()
    got = tuned_apply(MODEL, retrieval_params, adapter, cfg, pixels, method=Blip.encode_image)
    base = MODEL.apply({"params": retrieval_params}, pixels, method=Blip.encode_image)
    want = ref.ref_vit(retrieval_params["visual_encoder"], adapter["factors"]["visual_encoder"],
                       ref.from_jax_adapter(adapter), pixels, TINY_RETRIEVAL.vision)
    assert max_rel_err(base, _np(want)) > 1e-2  # the adapter changes the output substantially
    assert max_rel_err(got, _np(want)) < TOL


def test_bert_unimodal_has_no_gqt(retrieval_params, retrieval_adapter, aurora_cfg):
    """encode_text: q/k/v deltas (dropout before M) in self-attention; GQT must not act."""
    _, ids, mask = blip_inputs()
    got = tuned_apply(MODEL, retrieval_params, retrieval_adapter, aurora_cfg, ids, mask,
                      method=Blip.encode_text)
    want = ref.ref_bert(retrieval_params["text_encoder"], retrieval_adapter["factors"]["text_encoder"], None,
                        ref.from_jax_adapter(retrieval_adapter), ids, mask, TINY_RETRIEVAL.text)
    assert max_rel_err(got, _np(want)) < TOL


def test_bert_multimodal_with_gqt(retrieval_params, retrieval_adapter, aurora_cfg, image_embeds):
    """encode_multimodal: self- and cross-attention deltas (image tokens through the same U, V) + GQT."""
    _, ids, mask = blip_inputs()
    got = tuned_apply(MODEL, retrieval_params, retrieval_adapter, aurora_cfg, ids, mask, image_embeds,
                      method=Blip.encode_multimodal)
    aurora = ref.from_jax_adapter(retrieval_adapter)
    args = (retrieval_params["text_encoder"], retrieval_adapter["factors"]["text_encoder"])
    gqt = retrieval_adapter["gqt"]["text_encoder"]
    want = ref.ref_bert(*args, gqt, aurora, ids, mask, TINY_RETRIEVAL.text, enc=image_embeds)
    no_gqt = ref.ref_bert(*args, None, aurora, ids, mask, TINY_RETRIEVAL.text, enc=image_embeds)
    assert max_rel_err(_np(no_gqt), _np(want)) > 1e-2
    assert max_rel_err(got, _np(want)) < TOL


def test_vqa_answer_decoder(vqa_params, vqa_adapter, aurora_cfg):
    """Causal answer decoder with cross-attention to question states: deltas + GQT, then the LM head."""
    pixels, ids, mask = blip_inputs()
    model = Blip(TINY_VQA)
    image = tuned_apply(model, vqa_params, vqa_adapter, aurora_cfg, pixels, method=Blip.encode_image)
    question = tuned_apply(model, vqa_params, vqa_adapter, aurora_cfg, ids, mask, image,
                           method=Blip.encode_multimodal)
    got = tuned_apply(model, vqa_params, vqa_adapter, aurora_cfg, ids, mask, question, mask,
                      method=Blip.decode)
    dec = vqa_params["text_decoder"]
    h = ref.ref_bert(dec["bert"], vqa_adapter["factors"]["text_decoder"]["bert"],
                     vqa_adapter["gqt"]["text_decoder"]["bert"], ref.from_jax_adapter(vqa_adapter), ids, mask,
                     TINY_VQA.text, enc=question, enc_mask=mask, causal=True)
    want = ref.ref_lm_head(dec["lm_head"], h, TINY_VQA.text)
    assert max_rel_err(got, _np(want)) < TOL


def test_dropout_positions():
    """The pure deltas with a fixed mask as 'dropout': ViT after M, BERT before M, fc1/fc2 after M."""
    rng = np.random.default_rng(0)
    d, r = 8, 4
    U, V = rng.normal(size=(d, r)), rng.normal(size=(r, d))
    C, P1, P4, P8 = (rng.normal(size=s) for s in ((r, r, r), (r, 1), (r, 4), (r, 8)))
    x, h = rng.normal(size=(2, 3, d)), rng.normal(size=(2, 3, 4 * d))
    aurora = ref.RefAurora(U.T, V.T, C)
    M = lambda P: jnp.einsum("ijr,rm->ijm", C, P)  # noqa: E731
    j = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    def masked(shape, seed):
        m = (np.random.default_rng(seed).random(shape) > 0.3) * 2.0
        return m, (lambda z: z * j(m))

    m, drop = masked((2, 3, 4, r), 1)  # (..., k, R): one mask per column of P
    got = mode_approx_delta(j(x), j(U), j(V), M(P4), drop)
    want = torch.stack([aurora.vit(ref.t(x), P4, k, ref.t(m[..., k, :])) for k in range(4)], -2)
    assert max_rel_err(got, _np(want)) < TOL

    m, drop = masked((2, 3, r), 2)
    got = mode_approx_delta_text(j(x), j(U), j(V), M(P1)[:, :, 0], drop)
    assert max_rel_err(got, _np(aurora.bert(ref.t(x), P1, ref.t(m)))) < TOL

    m, drop = masked((2, 3, 4 * r), 3)
    got = mode_approx_fc1_delta(j(x), j(U), j(V), M(P8)[:, :, 0:4], drop)
    assert max_rel_err(got, _np(aurora.fc1(ref.t(x), P8, ref.t(m)))) < TOL

    m, drop = masked((2, 3, r), 4)
    got = mode_approx_fc2_delta(j(h), j(U), j(V), M(P8)[:, :, 4:8], drop)
    assert max_rel_err(got, _np(aurora.fc2(ref.t(h), P8, ref.t(m)))) < TOL
