"""Full mPLUG-Owl / Owl2 (ViT -> abstractor -> splice -> LLaMA) vs torch references; generation; sharding."""

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
from aurora_jax.models.owl import (
    EXPANDED_IMAGE_ID,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    Owl,
    OwlConfig,
    OwlDecoder,
    abstract_params,
    expand_placeholders,
    init_params,
    placeholder_errors,
    splice_images,
)
from aurora_jax.parallel.mesh import DEFAULT_RULES, make_mesh, param_shardings
from aurora_jax.tasks import instruct
from tests.fixtures import REF_IMG, REF_K, convert_sd, make_owl_ref, ref_owl_config, rel_err, t2n
from tests.models.owl_torch_ref import ref_release_forward

TOL = 1e-5


def _ids(version: int, layout, vocab: int, seed: int = 0, *, release: bool = False, pad: bool = False):
    """layout per sample: list of ints (text run lengths) and 'I' (an image): REF_K expanded ids, or one -200
    (release=True). pad=True right-pads the rows to one length (id 0) and also returns the mask."""
    rng = np.random.RandomState(seed)
    rows = []
    for sample in layout:
        row = []
        for part in sample:
            if part == "I":
                row += [IMAGE_TOKEN_INDEX] if release else [EXPANDED_IMAGE_ID] * REF_K
            else:
                row += list(rng.randint(3, vocab, part))
        rows.append(row)
    if not pad:
        return np.asarray(rows, np.int64)
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


@pytest.fixture(scope="module", params=[1, 2], ids=["owl1", "owl2"])
def owl(request):
    version = request.param
    ref = make_owl_ref(version)
    cfg = ref_owl_config(version)
    params = convert_sd(owl_keymap(cfg), ref.state_dict(), abstract_params(cfg))
    return version, ref, cfg, params


def test_full_model_vs_torch_reference(owl):
    """Two samples with 2 and 1 images in the expanded form; params sharded on a 2x2x2 mesh."""
    version, ref, cfg, params = owl
    ids = _ids(version, [[3, "I", 2, "I", 4], [5, "I", 11]], cfg.llm.vocab_size)
    pixels = np.random.RandomState(1).randn(3, REF_IMG, REF_IMG, 3).astype(np.float32)
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
    pixels = np.random.RandomState(4).randn(2, REF_IMG, REF_IMG, 3).astype(np.float32)
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
    """Expanded runs (of 2 tokens per image) in rows; a row without any takes one image (the release's rule)."""
    ids = jnp.asarray([[5, -1, -1, 5, 5], [5, 5, 5, 5, 5], [-1, -1, 5, -1, -1]])
    x = expand_placeholders(ids, tokens_per_image=2)
    np.testing.assert_array_equal(x.input_ids, ids)  # already expanded: the identity
    visual = jnp.arange(1, 9, dtype=jnp.float32).reshape(4, 2, 1)
    out = np.asarray(splice_images(jnp.zeros((3, 5, 1)), x.image, x.token, x.modality, visual))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0, 0], [0, 0, 0, 0, 0], [5, 6, 0, 7, 8]])
    assert int(x.images_used) == 4


@pytest.mark.parametrize("owl", [2], indirect=True, ids=["owl2"])  # the expansion is version-free
def test_release_placeholders_vs_torch_reference(owl):
    """Release-style ids (one -200 per image) over three right-padded rows -- two images, text only, one
    image -- expanded inside the model, vs the release's prepare_inputs_labels_for_multimodal (restated in
    owl_torch_ref): each row's images spliced in place, the text-only row using up image 2 as the release
    does; logits, modality, labels and mask as the release's. Eagerly and under jit (image_slots=2)."""
    version, ref, cfg, params = owl
    ids, mask = _ids(version, [[3, "I", 2, "I", 4], [6], [5, "I", 11]], cfg.llm.vocab_size, seed=7, release=True,
                     pad=True)
    labels = np.where(mask > 0, ids, IGNORE_INDEX)
    pixels = np.random.RandomState(8).randn(4, REF_IMG, REF_IMG, 3).astype(np.float32)
    with torch.no_grad():
        logits, modality, want_labels, want_mask, used = ref_release_forward(
            ref, torch.tensor(ids), torch.tensor(mask), torch.tensor(labels), torch.tensor(pixels).permute(0, 3, 1, 2))
    assert used == 4
    x = expand_placeholders(ids, mask, labels, tokens_per_image=REF_K, image_slots=2)
    np.testing.assert_array_equal(x.modality, modality.numpy())
    np.testing.assert_array_equal(x.labels, want_labels.numpy())
    np.testing.assert_array_equal(x.attention_mask, want_mask.numpy())
    valid = want_mask.numpy() > 0
    got = jax.jit(lambda p, i, m, px: Owl(cfg).apply({"params": p}, i, px, m, image_slots=2))(
        params, ids, mask, pixels)
    assert got.shape[1] == ids.shape[1] + 2 * (REF_K - 1)
    err = rel_err(np.asarray(got)[valid], t2n(logits)[valid])
    print(f"mPLUG-Owl{'' if version == 1 else '2'} release-style ids: logits rel err {err:.2e}")
    assert err < TOL
    # Concrete ids without image_slots: exactly the room the rows need, nothing flagged.
    eager, bad = Owl(cfg).apply({"params": params}, ids, mask, pixels, None, method=Owl.expand)
    np.testing.assert_array_equal(eager.modality, x.modality)
    assert not np.asarray(bad).any()


@pytest.mark.parametrize("owl", [2], indirect=True, ids=["owl2"])
def test_ambiguous_placeholders_are_refused(owl):
    """Concrete ids: a ValueError naming the problem; under jit the offending rows come out NaN."""
    version, _, cfg, params = owl
    px = np.zeros((2, REF_IMG, REF_IMG, 3), np.float32)
    one = _ids(version, [[3, "I", 4]], cfg.llm.vocab_size, release=True)
    two_rows = np.concatenate([one, one])
    apply = lambda *a, **kw: Owl(cfg).apply({"params": params}, *a, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="take 2 images .* pixels holds 1"):
        apply(two_rows, px[:1])
    with pytest.raises(ValueError, match="take 1 images .* pixels holds 2"):
        apply(one, px)  # the release would silently ignore the extra image
    with pytest.raises(ValueError, match="no pixels"):
        apply(one)
    cut = np.asarray([[3] + [EXPANDED_IMAGE_ID] * (REF_K - 1) + [4]])
    with pytest.raises(ValueError, match="not a multiple of"):
        apply(cut, px[:1])
    with pytest.raises(ValueError, match="image_slots=0"):
        apply(one, px[:1], image_slots=0)
    # Under jit nothing can raise on values: the ambiguous rows are NaN (the NaN guard skips such a step).
    f = jax.jit(lambda i, p: Owl(cfg).apply({"params": params}, i, p))
    out = np.asarray(f(np.concatenate([cut, np.full_like(cut, 5)]), px))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()  # 2 images for 2 rows is right; row 0 is cut
    release = np.concatenate([np.asarray([[3, IMAGE_TOKEN_INDEX] + [4] * (REF_K - 1)]), np.full_like(cut, 5)])
    out = np.asarray(f(release, px))  # a -200 without image_slots under jit: no room, row 0
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    # A count that does not match flags every row.
    flags = jax.jit(lambda i: placeholder_errors(expand_placeholders(i, tokens_per_image=REF_K), 3, 0))
    np.testing.assert_array_equal(flags(np.concatenate([cut * 0 + 5, cut * 0 + 5])), [True, True])


@pytest.mark.parametrize("owl", [2], indirect=True, ids=["owl2"])
def test_release_style_prompts_generate_as_expanded(owl):
    """OwlDecoder(image_slots=1) on left-padded release-style prompts (expanded in the prefill, the cache grown
    to fit) == greedy decoding of the reference by full recomputation."""
    version, ref, cfg, params = owl
    rows = [_ids(version, [[2, "I", 5]], cfg.llm.vocab_size, seed=2, release=True)[0],
            _ids(version, [["I", 2]], cfg.llm.vocab_size, seed=3, release=True)[0]]
    pixels = np.random.RandomState(4).randn(2, REF_IMG, REF_IMG, 3).astype(np.float32)
    batch = instruct.collate([instruct.Example(x, x * 0, x * 0) for x in rows], pad_id=0, side="left")
    release = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "pixels": pixels}
    got = generate(OwlDecoder(cfg, image_slots=1), params, release, None, SamplingConfig(max_new_tokens=4))
    expanded = [np.concatenate([[EXPANDED_IMAGE_ID] * REF_K if t == IMAGE_TOKEN_INDEX else [t] for t in r])
                for r in rows]
    want = np.stack([_ref_greedy(ref, e, pixels[i : i + 1], 4) for i, e in enumerate(expanded)])
    np.testing.assert_array_equal(np.asarray(got.tokens), want)


def test_config_checks():
    cfg = ref_owl_config(2)
    with pytest.raises(ValueError, match="modality_adaptive"):
        cfg.replace(llm=cfg.llm.replace(modality_adaptive=False))
    with pytest.raises(ValueError, match="output_size"):
        cfg.replace(abstractor=cfg.abstractor.replace(output_size=8))
    assert OwlConfig.from_dict(cfg.to_dict()) == cfg


def test_every_param_has_logical_axes():
    cfg = ref_owl_config(2)
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
