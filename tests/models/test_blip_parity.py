"""BLIP in Flax vs transformers' PyTorch BLIP on random weights, float32, through our converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.models.blip import Blip
from aurora_jax.tasks.caption import greedy_decode
from tests.fixtures import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RTOL = 1e-5


def nchw_to_nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.array([[1, 5, 6, 7, 8, 3], [1, 9, 10, 3, 0, 0]], np.int64)  # second row padded
    return pixels, ids, (ids != 0).astype(np.int64)


@pytest.fixture(scope="module")
def converted(hf_blip):
    from aurora_jax.convert.blip import load_blip

    return {task: load_blip(folder) for task, (_, folder) in hf_blip.items()}


def test_itm_and_itc_match_transformers(hf_blip, converted, inputs):
    pixels, ids, mask = inputs
    hf = hf_blip["retrieval"][0]
    cfg, params = converted["retrieval"]
    with torch.no_grad():
        t = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), attention_mask=torch.tensor(mask))
        ref_itm = hf(**t, use_itm_head=True).itm_score.numpy()
        ref_itc = hf(**t, use_itm_head=False).itm_score.numpy()
    model, v = Blip(cfg), {"params": params}
    args = (nchw_to_nhwc(pixels), jnp.asarray(ids), jnp.asarray(mask))
    itm = model.apply(v, *args, method=Blip.itm)
    itc = model.apply(v, *args, method=Blip.itc)
    assert rel_err(itm, ref_itm) < RTOL
    assert rel_err(itc, ref_itc) < RTOL


def test_vqa_decoder_logits_match_transformers(hf_blip, converted, inputs):
    pixels, q, qmask = inputs
    hf = hf_blip["vqa"][0]
    cfg, params = converted["vqa"]
    a = np.array([[cfg.bos_token_id, 11, 12, 3], [cfg.bos_token_id, 13, 3, 0]], np.int64)
    amask = (a != 0).astype(np.int64)
    with torch.no_grad():
        image = hf.vision_model(torch.tensor(pixels))[0]
        question = hf.text_encoder(input_ids=torch.tensor(q), attention_mask=torch.tensor(qmask),
                                   encoder_hidden_states=image)[0]
        # transformers' VQA decoder attends to every question token (its generate passes a ones mask).
        ref = hf.text_decoder(input_ids=torch.tensor(a), attention_mask=torch.tensor(amask),
                              encoder_hidden_states=question).logits.numpy()
    model, v = Blip(cfg), {"params": params}
    image_j = model.apply(v, nchw_to_nhwc(pixels), method=Blip.encode_image)
    q_j = model.apply(v, jnp.asarray(q), jnp.asarray(qmask), image_j, method=Blip.encode_multimodal)
    assert rel_err(q_j, question.numpy()) < RTOL
    logits = model.apply(v, jnp.asarray(a), jnp.asarray(amask), q_j, method=Blip.decode)
    assert rel_err(logits, ref) < RTOL


def test_decoder_cross_attention_mask_hides_question_padding(converted, inputs):
    """Padded question tokens must not change the answer logits when masked out (BLIP's training path)."""
    pixels, q, qmask = inputs
    cfg, params = converted["vqa"]
    model, v = Blip(cfg), {"params": params}
    image = model.apply(v, nchw_to_nhwc(pixels[1:]), method=Blip.encode_image)
    a = jnp.array([[cfg.bos_token_id, 11, 12, 3]])
    states = model.apply(v, jnp.asarray(q[1:]), jnp.asarray(qmask[1:]), image, method=Blip.encode_multimodal)
    padded = model.apply(v, a, jnp.ones_like(a), states, jnp.asarray(qmask[1:]), method=Blip.decode)
    n = int(qmask[1].sum())
    trimmed = model.apply(v, a, jnp.ones_like(a), states[:, :n], method=Blip.decode)
    assert rel_err(padded, trimmed) < 1e-6


def test_caption_logits_and_greedy_generation_match_transformers(hf_blip, converted, inputs):
    pixels, _, _ = inputs
    hf = hf_blip["caption"][0]
    cfg, params = converted["caption"]
    prompt = np.array([[cfg.bos_token_id, 21, 22]] * 2, np.int64)
    with torch.no_grad():
        ref_logits = hf(pixel_values=torch.tensor(pixels), input_ids=torch.tensor(prompt)).logits.numpy()
        # generate() replaces the first id by BOS and drops the last one (BLIP's trailing [SEP]).
        with_sep = np.concatenate([prompt, np.full((2, 1), cfg.sep_token_id)], axis=1)
        ref_tokens = hf.generate(pixel_values=torch.tensor(pixels), input_ids=torch.tensor(with_sep),
                                 max_length=16, min_length=0, num_beams=1, do_sample=False).numpy()
    model, v = Blip(cfg), {"params": params}
    logits = model.apply(v, nchw_to_nhwc(pixels), jnp.asarray(prompt), jnp.ones_like(jnp.asarray(prompt)),
                         method=Blip.caption_logits)
    assert rel_err(logits, ref_logits) < RTOL

    image = model.apply(v, nchw_to_nhwc(pixels), method=Blip.encode_image)
    tokens = jax.jit(lambda img: greedy_decode(
        lambda t: model.apply(v, t, None, img, method=Blip.decode),
        jnp.asarray(prompt), max_len=16, eos_id=cfg.sep_token_id, pad_id=cfg.pad_token_id))(image)
    tokens = np.asarray(tokens)
    for row, ref in zip(tokens, ref_tokens):
        ref = ref[ref != cfg.pad_token_id] if (ref == cfg.sep_token_id).any() else ref
        assert row[: len(ref)].tolist() == ref.tolist()
    assert tokens.shape[1] == 16


def test_full_blip_base_shape_matches_transformers():
    """ITM and ITC at BLIP-base widths and depths (ViT-B/16, BERT-base), on a small image to stay fast."""
    from aurora_jax.convert.blip import convert_blip
    from aurora_jax.convert.readers import DictSource

    torch.manual_seed(0)
    cfg = transformers.BlipConfig(vision_config=dict(image_size=64), text_config=dict())
    hf = transformers.BlipForImageTextRetrieval(cfg).float().eval()
    with torch.no_grad():  # every tensor random, so no all-ones norm or zero bias hides a swap
        for p in hf.parameters():
            p.normal_(0.0, 0.02)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    conv = convert_blip(DictSource(state), task="retrieval", config=_base_config())
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102], [101, 2178, 3231, 102, 0, 0]], np.int64)
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        t = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), attention_mask=torch.tensor(mask))
        ref_itm = hf(**t, use_itm_head=True).itm_score.numpy()
        ref_itc = hf(**t, use_itm_head=False).itm_score.numpy()
    model, v = Blip(conv.config), {"params": conv.params}
    args = (nchw_to_nhwc(pixels), jnp.asarray(ids), jnp.asarray(mask))
    assert rel_err(model.apply(v, *args, method=Blip.itm), ref_itm) < RTOL
    assert rel_err(model.apply(v, *args, method=Blip.itc), ref_itc) < RTOL


def _base_config():
    from aurora_jax.models.bert import BertConfig
    from aurora_jax.models.blip import BlipConfig
    from aurora_jax.models.vit import ViTConfig

    # transformers' BLIP defaults: ViT-B/16 with LayerNorm eps 1e-5, BERT-base with the 30524-token vocab.
    return BlipConfig(vision=ViTConfig(image_size=64, eps=1e-5), text=BertConfig(), task="retrieval")
