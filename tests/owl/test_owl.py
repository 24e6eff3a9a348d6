"""Full mPLUG-Owl / Owl2 (ViT -> abstractor -> splice -> LLaMA) vs torch references; generation; templates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec

from aurora_jax.convert.owl import owl_keymap
from aurora_jax.generate import SamplingConfig, generate
from aurora_jax.models import layers
from aurora_jax.models.owl import Owl, OwlConfig, OwlDecoder, abstract_params, init_params, splice_images
from aurora_jax.parallel.mesh import DEFAULT_RULES, make_mesh, param_shardings
from aurora_jax.tasks import instruct
from tests.owl.conftest import IMG, K, convert_sd, make_owl_ref, rel_err, t2n, tiny_owl_config

TOL = 1e-5


def _ids(version: int, layout, vocab: int, seed: int = 0):
    """layout per sample: list of ints (text run lengths) and 'I' (an image)."""
    rng = np.random.RandomState(seed)
    ph = instruct.IMAGE_PLACEHOLDER_ID[version]
    rows = []
    for sample in layout:
        row = []
        for part in sample:
            row += [ph] * K if part == "I" else list(rng.randint(3, vocab, part))
        rows.append(row)
    return np.asarray(rows, np.int64)


@pytest.fixture(scope="module", params=[1, 2], ids=["owl1", "owl2"])
def owl(request):
    version = request.param
    ref = make_owl_ref(version)
    cfg = tiny_owl_config(version)
    params = convert_sd(owl_keymap(cfg), ref.state_dict(), abstract_params(cfg))
    return version, ref, cfg, params


def test_full_model_vs_torch_reference(owl):
    """Two samples with 2 and 1 images plus an unused padding image; params sharded on a 2x2x2 mesh."""
    version, ref, cfg, params = owl
    ids = _ids(version, [[3, "I", 2, "I", 4], [5, "I", 11]], cfg.llm.vocab_size)
    pixels = np.random.RandomState(1).randn(4, IMG, IMG, 3).astype(np.float32)
    specs = layers.logical_axes(init_params(cfg, jax.random.key(0), boxed=True))
    sharded = jax.device_put(params, param_shardings(params, specs, make_mesh((2, 2, 2))))
    got = jax.jit(lambda p, i, x: Owl(cfg).apply({"params": p}, i, x))(sharded, ids, pixels)
    with torch.no_grad():
        want = t2n(ref(torch.tensor(ids), torch.tensor(pixels[:3]).permute(0, 3, 1, 2)))
    err = rel_err(got, want)
    print(f"mPLUG-Owl{'' if version == 1 else '2'} full-model logits rel err: {err:.2e}")
    assert err < TOL


def _ref_greedy(ref, ids: np.ndarray, pixels: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding by recomputing the whole sequence for every new token."""
    seq = torch.tensor(ids[None])
    with torch.no_grad():
        for _ in range(n):
            nxt = ref(seq, torch.tensor(pixels).permute(0, 3, 1, 2))[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[0, len(ids) :].numpy()


def test_greedy_generation_left_padded_batch_vs_reference(owl):
    version, ref, cfg, params = owl
    n_new = 6
    a = _ids(version, [[2, "I", 5]], cfg.llm.vocab_size, seed=2)[0]
    b = _ids(version, [["I", 2]], cfg.llm.vocab_size, seed=3)[0]
    pixels = np.random.RandomState(4).randn(2, IMG, IMG, 3).astype(np.float32)
    want = np.stack([_ref_greedy(ref, a, pixels[:1], n_new), _ref_greedy(ref, b, pixels[1:], n_new)])
    batch = instruct.collate(
        [instruct.Example(x, x * 0, (x < 0).astype(np.int32)) for x in (a, b)], pad_id=0, side="left"
    )
    inputs = {
        "input_ids": jnp.asarray(batch["input_ids"]),
        "attention_mask": jnp.asarray(batch["attention_mask"]),
        "pixels": jnp.asarray(pixels),
    }
    out = generate(OwlDecoder(cfg), params, inputs, None, SamplingConfig(max_new_tokens=n_new))
    np.testing.assert_array_equal(np.asarray(out.tokens), want)


def test_splice_images_order():
    text = jnp.zeros((2, 5, 1))
    mask = jnp.asarray([[0, 1, 1, 0, 0], [1, 1, 0, 1, 1]], bool)
    visual = jnp.arange(1, 9, dtype=jnp.float32).reshape(4, 2, 1)
    out = np.asarray(splice_images(text, mask, visual))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0, 0], [3, 4, 0, 5, 6]])


def test_config_checks():
    cfg = tiny_owl_config(2)
    with pytest.raises(ValueError, match="modality_adaptive"):
        cfg.replace(llm=cfg.llm.replace(modality_adaptive=False))
    with pytest.raises(ValueError, match="output_size"):
        cfg.replace(abstractor=cfg.abstractor.replace(output_size=8))
    assert OwlConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------ templates


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


def test_every_param_has_logical_axes():
    cfg = tiny_owl_config(2)
    boxed = init_params(cfg, jax.random.key(0), boxed=True)
    specs = layers.logical_axes(boxed)
    shapes = dict(jax.tree_util.tree_leaves_with_path(layers.unbox(boxed)))
    known = {name for name, _ in DEFAULT_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda s: isinstance(s, PartitionSpec) or s is None
    )
    assert len(leaves) == len(shapes)
    for path, spec in leaves:
        assert isinstance(spec, PartitionSpec), layers.path_str(path)
        assert len(spec) == shapes[path].ndim and {a for a in spec if a} <= known, (
            layers.path_str(path),
            spec,
        )
