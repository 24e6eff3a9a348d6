"""Building blocks: bicubic position-table resize vs torch, attention masks, logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.models import layers
from aurora_jax.models.blip import abstract_params
from aurora_jax.models.vit import ViTConfig, resize_pos_embed
from tests.fixtures import tiny_blip_config

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("old,new", [(4, 6), (6, 4), (5, 5), (3, 8)])
def test_resize_pos_embed_matches_torch_bicubic(old, new):
    rng = np.random.default_rng(old * 10 + new)
    pos = rng.standard_normal((1, 1 + old * old, 8)).astype(np.float32)
    grid = torch.tensor(pos[:, 1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    ref = torch.cat([torch.tensor(pos[:, :1]), ref.permute(0, 2, 3, 1).reshape(1, new * new, 8)], dim=1).numpy()
    for out in (resize_pos_embed(pos, new), resize_pos_embed(jnp.asarray(pos), new)):
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)


def test_attention_masks():
    pad = layers.padding_mask(jnp.array([[1, 1, 0]]))
    causal = layers.causal_mask(3, 3)
    both = np.asarray(layers.combine_masks(pad, causal))[0, 0]
    np.testing.assert_array_equal(both, [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
    # A query offset by 2 (decoding with a cache) sees keys 0..2.
    np.testing.assert_array_equal(np.asarray(layers.causal_mask(1, 4, offset=2))[0, 0], [[1, 1, 1, 0]])


def test_attention_ignores_masked_keys():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32) for _ in range(3))
    mask = layers.padding_mask(jnp.array([[1, 1, 0]]))
    full = layers.dot_product_attention(q, k, v, mask)
    cut = layers.dot_product_attention(q, k[:, :2], v[:, :2])
    np.testing.assert_allclose(np.asarray(full), np.asarray(cut), rtol=1e-6, atol=1e-6)


def test_vit_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="qkv_layout"):
        ViTConfig(qkv_layout="kvq")
    with pytest.raises(ValueError, match="unknown activation"):
        ViTConfig(act="swish2")


def test_every_parameter_has_logical_axes():
    for task in ("retrieval", "vqa", "caption"):
        boxed = abstract_params(tiny_blip_config(task), boxed=True)
        specs = jax.tree_util.tree_leaves(layers.logical_axes(boxed), is_leaf=lambda x: x is None)
        assert all(s is not None for s in specs)
        plain = layers.unbox(boxed)
        for leaf, spec in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(
                layers.logical_axes(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
            assert len(spec) == leaf.ndim


def test_padded_attention_equals_unpadded():
    """The cuDNN path pads 577 ViT tokens to 640 and hides the padding with key_value_seq_lengths."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 4, 8)), jnp.float32) for _ in range(3))
    ref = layers.dot_product_attention(q, k, v)
    np.testing.assert_allclose(layers.dot_product_attention(q, k, v, pad_multiple=16), ref, rtol=1e-5, atol=1e-6)
    mask = layers.padding_mask(jnp.asarray((np.arange(37) < 30)[None].repeat(2, 0)))
    np.testing.assert_allclose(layers.dot_product_attention(q, k, v, mask, pad_multiple=16),
                               layers.dot_product_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
