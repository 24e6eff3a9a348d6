"""Beam search vs transformers' `generate(num_beams=3)` on a tiny random BLIP captioner: identical tokens."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.models.blip import Blip
from aurora_jax.tasks.caption import beam_search

torch = pytest.importorskip("torch")

NUM_BEAMS = 3
SETTINGS = [  # (min_length, max_length, early_stopping); BLIP captions with min 5, max 20
    (5, 20, False),
    (5, 20, True),
    (0, 12, False),
]


@pytest.fixture(scope="module")
def captioner(hf_blip, tmp_path_factory):
    """The fixture's captioner with a decoder that depends on its context and ends captions at varied lengths.

    The fixture's N(0, 0.5) weights make the decoder repeat one token with eos never likely; here the decoder
    gets unit LayerNorms, smaller embeddings, flatter logits and an eos bias, so beams compete and finish at
    different steps (some at min_length, some by length, some in between).
    """
    from aurora_jax.convert.blip import load_blip

    hf = copy.deepcopy(hf_blip["caption"][0])
    sep = hf.config.text_config.sep_token_id
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.text_decoder.named_parameters():
            if "LayerNorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "embeddings" in name else 1.0))
        hf.text_decoder.cls.predictions.transform.LayerNorm.weight.fill_(0.3)
        hf.text_decoder.cls.predictions.bias[sep] += 2.0
    folder = tmp_path_factory.mktemp("hf_caption_beams")
    hf.save_pretrained(folder)
    return hf, load_blip(folder)


def _until_eos(row: np.ndarray, start: int, eos: int) -> list[int]:
    """Tokens up to and including the first generated eos (transformers pads its rows with eos, we with pad)."""
    hits = np.flatnonzero(row[start:] == eos)
    return row[: start + hits[0] + 1].tolist() if hits.size else row.tolist()


def test_beam_search_matches_transformers(captioner):
    hf, (cfg, params) = captioner
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    prompt = np.array([[cfg.bos_token_id, 21, 22]] * 8, np.int64)
    with_sep = np.concatenate([prompt, np.full((8, 1), cfg.sep_token_id)], axis=1)  # generate() drops it
    model, v = Blip(cfg), {"params": params}
    image = model.apply(v, jnp.asarray(pixels.transpose(0, 2, 3, 1)), method=Blip.encode_image)
    states = jnp.repeat(image, NUM_BEAMS, axis=0)  # row b * num_beams + k
    logits_fn = lambda t: model.apply(v, t, None, states, method=Blip.decode)

    outputs, lengths = {}, set()
    for min_len, max_len, early in SETTINGS:
        with torch.no_grad():
            ref = hf.generate(pixel_values=torch.tensor(pixels), input_ids=torch.tensor(with_sep),
                              num_beams=NUM_BEAMS, min_length=min_len, max_length=max_len, early_stopping=early,
                              do_sample=False, return_dict_in_generate=True, output_scores=True)
        search = jax.jit(lambda p, mn=min_len, mx=max_len, es=early: beam_search(
            logits_fn, p, num_beams=NUM_BEAMS, max_len=mx, min_len=mn, eos_id=cfg.sep_token_id,
            pad_id=cfg.pad_token_id, early_stopping=es))
        tokens, scores = map(np.asarray, search(jnp.asarray(prompt)))
        assert tokens.shape == (8, max_len)
        for row, ref_row in zip(tokens, ref.sequences.numpy()):
            ours = _until_eos(row, 3, cfg.sep_token_id)
            assert ours == _until_eos(ref_row, 3, cfg.sep_token_id)
            assert (row[len(ours):] == cfg.pad_token_id).all()
            assert len(ours) >= min_len
            lengths.add(len(ours))
        np.testing.assert_allclose(scores, ref.sequences_scores.numpy(), rtol=1e-5)
        outputs[(min_len, max_len, early)] = tokens
    # The case is not trivial: captions end at min_length, by length and in between; early stopping matters.
    assert {6, 20} <= lengths and len(lengths) >= 4
    assert not np.array_equal(outputs[SETTINGS[0]], outputs[SETTINGS[1]])
