"""mPLUG-Owl2's image preprocessing (expand2square + the CLIP processor) vs transformers' CLIPImageProcessor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from aurora_jax.data import transforms as T


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _processor(size: int, crop: int):
    """The release's processor settings (CLIP ViT-L/14's preprocessor_config), built here: no download."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop}, resample=3,
               do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               image_mean=list(T.CLIP_MEAN), image_std=list(T.CLIP_STD), do_convert_rgb=True)


@pytest.mark.parametrize("w,h", [(45, 30), (30, 52)], ids=["wide", "tall"])
def test_clip_preprocess_vs_transformers(w, h):
    """Shortest side to 24 (bicubic), centre crop 20, rescale, normalise, on non-square images."""
    img = _image(w, h)
    want = np.asarray(_processor(24, 20)(img, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
    got = T.clip_preprocess(img, 24, 20)
    assert got.shape == want.shape == (20, 20, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_owl2_transform_is_the_releases_pad_then_clip():
    """expand2square with the mean colour (122, 116, 104), centred, then CLIP at the model size."""
    img = _image(40, 24, seed=1)
    square = T.expand2square(img, (122, 116, 104))
    assert square.size == (40, 40)
    arr = np.asarray(square)
    assert (arr[:8] == (122, 116, 104)).all() and (arr[32:] == (122, 116, 104)).all()  # (40 - 24) // 2 = 8 rows
    np.testing.assert_array_equal(arr[8:32], np.asarray(img))
    want = np.asarray(_processor(32, 32)(square, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
    got = T.owl2_transform(img, 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # v1 is one bicubic resize to the square size: different from the padded Owl2 input on this image.
    assert np.abs(T.owl_transform(1)(img, 32) - got).max() > 0.1
    assert T.owl_transform(2) is T.owl2_transform
    tall = T.expand2square(_image(10, 17, seed=2), (0, 0, 0))
    assert np.asarray(tall)[:, :3].max() == 0 and tall.size == (17, 17)  # (17 - 10) // 2 = 3 columns
