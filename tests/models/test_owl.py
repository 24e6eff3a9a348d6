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
from aurora_jax.models.owl import Owl, OwlConfig, OwlDecoder, abstract_params, init_params, splice_images
from aurora_jax.parallel.mesh import DEFAULT_RULES, make_mesh, param_shardings
from aurora_jax.tasks import instruct
from tests.fixtures import REF_IMG, REF_K, convert_sd, make_owl_ref, ref_owl_config, rel_err, t2n

TOL = 1e-5


def _ids(version: int, layout, vocab: int, seed: int = 0):
    """layout per sample: list of ints (text run lengths) and 'I' (an image)."""
    rng = np.random.RandomState(seed)
    ph = instruct.IMAGE_PLACEHOLDER_ID[version]
    rows = []
    for sample in layout:
        row = []
        for part in sample:
            row += [ph] * REF_K if part == "I" else list(rng.randint(3, vocab, part))
        rows.append(row)
    return np.asarray(rows, np.int64)


@pytest.fixture(scope="module", params=[1, 2], ids=["owl1", "owl2"])
def owl(request):
    version = request.param
    ref = make_owl_ref(version)
    cfg = ref_owl_config(version)
    params = convert_sd(owl_keymap(cfg), ref.state_dict(), abstract_params(cfg))
    return version, ref, cfg, params


def test_full_model_vs_torch_reference(owl):
    """Two samples with 2 and 1 images plus an unused padding image; params sharded on a 2x2x2 mesh."""
    version, ref, cfg, params = owl
    ids = _ids(version, [[3, "I", 2, "I", 4], [5, "I", 11]], cfg.llm.vocab_size)
    pixels = np.random.RandomState(1).randn(4, REF_IMG, REF_IMG, 3).astype(np.float32)
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
    text = jnp.zeros((2, 5, 1))
    mask = jnp.asarray([[0, 1, 1, 0, 0], [1, 1, 0, 1, 1]], bool)
    visual = jnp.arange(1, 9, dtype=jnp.float32).reshape(4, 2, 1)
    out = np.asarray(splice_images(text, mask, visual))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0, 0], [3, 4, 0, 5, 6]])


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
