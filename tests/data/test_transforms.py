"""BLIP image transforms: layout, normalisation numbers, seeded determinism, augmentation effects."""

import numpy as np
import pytest
from PIL import Image

from aurora_jax.data import transforms as T
from tests.data.conftest import corrupt_jpeg, encoded_image


def _image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return T.decode_image(encoded_image(*size, fmt="PNG", seed=seed))


def test_decode_image_rgb_and_corrupt():
    grey = T.decode_image(encoded_image(8, 6, "PNG", mode="L"))
    assert grey.mode == "RGB" and grey.size == (8, 6)
    for bad in (corrupt_jpeg(), b"", b"not an image at all"):
        with pytest.raises(T.CorruptImageError):
            T.decode_image(bad)
    assert issubclass(T.CorruptImageError, ValueError)


def test_normalisation_numbers():
    img = Image.new("RGB", (4, 4), (255, 0, 128))
    out = T.test_transform(img, 4)
    expected = (np.array([1.0, 0.0, 128 / 255]) - np.array(T.CLIP_MEAN)) / np.array(T.CLIP_STD)
    assert out.dtype == np.float32 and out.shape == (4, 4, 3)
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(T.denormalize(out)[0, 0], [255, 0, 128])


def test_test_transform_is_bicubic_resize():
    img = _image()
    out = T.test_transform(img, 16)
    ref = T.normalize(img.resize((16, 16), Image.Resampling.BICUBIC))
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, ref)


def test_train_transform_shape_and_determinism():
    img = _image(1)
    a = T.train_transform(img, 24, np.random.default_rng([7, 0, 3]))
    b = T.train_transform(img, 24, np.random.default_rng([7, 0, 3]))
    c = T.train_transform(img, 24, np.random.default_rng([7, 1, 3]))
    assert a.shape == (24, 24, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_resized_crop_box_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(50):
        left, top, right, bottom = T.random_resized_crop_box(100, 80, rng)
        w, h = right - left, bottom - top
        assert 0 <= left and right <= 100 and 0 <= top and bottom <= 80
        assert 0.5 * 8000 * 0.95 <= w * h <= 8000
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # A very wide image never fits the ratio range: centre crop with the ratio clamped.
    assert T.random_resized_crop_box(100, 10, rng, scale=(0.99, 1.0)) == (44, 0, 57, 10)


@pytest.mark.parametrize(
    "op", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "AutoContrast", "Equalize"]
)
def test_randaugment_ops_change_pixels(op):
    img = _image(2, (32, 32))
    out = T.rand_augment(img, np.random.default_rng(0), num_ops=1, magnitude=5, ops=[op], prob=1.0)
    assert out.size == img.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(img))


def test_randaugment_blip_quirks():
    img = _image(3, (32, 32))
    rng = np.random.default_rng(0)
    # At BLIP's M=5 the enhance factor is exactly 1: Brightness and Sharpness leave the image unchanged.
    for op in ("Brightness", "Sharpness", "Identity"):
        out = T.rand_augment(img, rng, num_ops=1, magnitude=5, ops=[op], prob=1.0)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    assert T.BLIP_RANDAUG_OPS == (
        "Identity",
        "AutoContrast",
        "Brightness",
        "Sharpness",
        "Equalize",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    )
    # TranslateX at M=5 moves the content by 5 pixels and fills with grey 128.
    moved = np.asarray(T.rand_augment(img, np.random.default_rng(1), 1, 5, ["TranslateX"], prob=1.0))
    src = np.asarray(img)
    shifted_left = np.array_equal(moved[:, :-5], src[:, 5:]) and (moved[:, -5:] == 128).all()
    shifted_right = np.array_equal(moved[:, 5:], src[:, :-5]) and (moved[:, :5] == 128).all()
    assert shifted_left or shifted_right


def test_randaugment_applies_each_op_with_probability_half():
    img = _image(4, (16, 16))
    changed = sum(
        not np.array_equal(
            np.asarray(T.rand_augment(img, np.random.default_rng(s), 1, 5, ["Rotate"])), np.asarray(img)
        )
        for s in range(200)
    )
    assert 70 < changed < 130
