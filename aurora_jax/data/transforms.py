"""BLIP's image transforms as pure PIL/numpy functions driven by an explicit `np.random.Generator`.

Every random choice comes from the generator passed in, so a pipeline that seeds it from
(seed, epoch, example) is reproducible and checkpointable. Outputs are float32 HWC arrays (NHWC
batches, the JAX layout) normalised with CLIP's mean and std, as BLIP does.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = Image.Resampling.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR


class CorruptImageError(ValueError):
    """Raised when image bytes cannot be decoded (truncated, not an image, empty)."""


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) to an RGB PIL image; CorruptImageError if unreadable."""
    if not data:
        raise CorruptImageError("empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # force the full decode here so truncation is caught now, not later
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot decode image ({len(data)} bytes): {e}") from e


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom) covering `scale` of the area with aspect ratio in `ratio`.

    Same sampling scheme as torchvision's RandomResizedCrop: ten tries, then a centred crop with the
    aspect ratio clamped to `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = round((width - w) / 2), round((height - h) / 2)  # centre, rounded as torchvision does
    return left, top, left + w, top + h


def random_resized_crop(
    img: Image.Image, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0)
) -> Image.Image:
    """Crop a random box (see `random_resized_crop_box`) and resize it bicubically to (size, size)."""
    box = random_resized_crop_box(img.width, img.height, rng, scale)
    return img.crop(box).resize((size, size), _BICUBIC)


def random_horizontal_flip(img: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    return ImageOps.mirror(img) if rng.random() < p else img


# ----------------------------------------------------------------------------------------------
# RandAugment with BLIP's operation list and magnitude scale
# ----------------------------------------------------------------------------------------------

MAX_LEVEL = 10.0
_FILL = (128, 128, 128)  # BLIP fills uncovered pixels with mid-grey
_TRANSLATE_PIXELS = 10.0  # translation at level 10, in pixels (not a fraction of the size)


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _enhance_factor(level: float) -> float:
    # Level 5 gives factor 1.0: BLIP's Brightness and Sharpness are no-ops at its default M=5.
    return level / MAX_LEVEL * 1.8 + 0.1


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    # A pure translation by whole pixels samples exact pixel centres, where bilinear weights are 1 and 0:
    # NEAREST gives the identical image about 40x faster (BLIP's M=5 translates by exactly 5 px).
    a, b, c, d, e, f = coeffs
    whole_shift = (a, b, d, e) == (1.0, 0.0, 0.0, 1.0) and float(c).is_integer() and float(f).is_integer()
    resample = Image.Resampling.NEAREST if whole_shift else _BILINEAR
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=_FILL)


def _identity(img, level, rng):
    return img


def _autocontrast(img, level, rng):
    return ImageOps.autocontrast(img)


def _equalize(img, level, rng):
    return ImageOps.equalize(img)


def _brightness(img, level, rng):
    return ImageEnhance.Brightness(img).enhance(_enhance_factor(level))


def _sharpness(img, level, rng):
    return ImageEnhance.Sharpness(img).enhance(_enhance_factor(level))


def _shear_x(img, level, rng):
    return _affine(img, (1.0, _signed(level / MAX_LEVEL * 0.3, rng), 0.0, 0.0, 1.0, 0.0))


def _shear_y(img, level, rng):
    return _affine(img, (1.0, 0.0, 0.0, _signed(level / MAX_LEVEL * 0.3, rng), 1.0, 0.0))


def _translate_x(img, level, rng):
    return _affine(img, (1.0, 0.0, _signed(level / MAX_LEVEL * _TRANSLATE_PIXELS, rng), 0.0, 1.0, 0.0))


def _translate_y(img, level, rng):
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, _signed(level / MAX_LEVEL * _TRANSLATE_PIXELS, rng)))


def _rotate(img, level, rng):
    return img.rotate(_signed(level / MAX_LEVEL * 30.0, rng), resample=_BILINEAR, fillcolor=_FILL)


AugmentOp = Callable[[Image.Image, float, np.random.Generator], Image.Image]
RANDAUG_OPS: dict[str, AugmentOp] = {
    "Identity": _identity,
    "AutoContrast": _autocontrast,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "Equalize": _equalize,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
}
BLIP_RANDAUG_OPS = tuple(RANDAUG_OPS)


def rand_augment(
    img: Image.Image,
    rng: np.random.Generator,
    num_ops: int = 2,
    magnitude: float = 5,
    ops: Sequence[str] = BLIP_RANDAUG_OPS,
    prob: float = 0.5,
) -> Image.Image:
    """BLIP's RandAugment: draw `num_ops` ops with replacement, apply each with probability `prob`."""
    for k in rng.integers(0, len(ops), size=num_ops):
        if rng.random() < prob:
            img = RANDAUG_OPS[ops[int(k)]](img, magnitude, rng)
    return img


# ----------------------------------------------------------------------------------------------
# To arrays
# ----------------------------------------------------------------------------------------------


def normalize(
    img: Image.Image | np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> np.ndarray:
    """uint8 RGB image -> float32 HWC array, scaled to [0, 1] then standardised per channel."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == len(mean) == len(std):
        # one table lookup per channel instead of three float passes: the same float32 ops on the same
        # 256 values, so bit-identical to the formula below, about twice as fast
        lut = _normalize_table(tuple(mean), tuple(std))
        out = np.empty(arr.shape, np.float32)
        for ch in range(arr.shape[-1]):
            np.take(lut[:, ch], arr[..., ch], out=out[..., ch])
        return out
    arr = np.asarray(arr, dtype=np.float32) / 255.0
    return (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@functools.lru_cache(maxsize=8)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """`normalize`'s formula evaluated on every uint8 value: (256, channels) float32."""
    values = np.arange(256, dtype=np.float32)[:, None] / 255.0
    table = (values - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    table.setflags(write=False)
    return table


def denormalize(
    arr: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> np.ndarray:
    """Inverse of `normalize` to uint8 (for looking at batches)."""
    x = np.asarray(arr, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def train_transform(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    randaug: bool = True,
) -> np.ndarray:
    """BLIP train transform: RandomResizedCrop(bicubic) + horizontal flip + RandAugment(2, 5) + normalise."""
    img = random_resized_crop(img, size, rng, scale)
    img = random_horizontal_flip(img, rng)
    if randaug:
        img = rand_augment(img, rng)
    return normalize(img)


def test_transform(img: Image.Image, size: int) -> np.ndarray:
    """BLIP test transform: bicubic resize to (size, size) + normalise."""
    if img.size != (size, size):
        img = img.resize((size, size), _BICUBIC)
    return normalize(img)


# ----------------------------------------------------------------------------------------------
# mPLUG-Owl / Owl2 preprocessing (X-PLUG/mPLUG-Owl)
# ----------------------------------------------------------------------------------------------


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """mPLUG-Owl2's mm_utils.expand2square: pad the short side to a square, the image centred (floor offset)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def clip_preprocess(img: Image.Image, size: int, crop_size: int | None = None,
                    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """transformers' CLIPImageProcessor: bicubic resize of the shortest side to `size` (the long side
    int(size * long / short)), centre crop to `crop_size`, rescale by 1/255, normalise."""
    crop = size if crop_size is None else crop_size
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _BICUBIC)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    if top < 0 or left < 0:
        raise ValueError(f"a {new_w}x{new_h} image cannot be centre-cropped to {crop}")
    img = img.crop((left, top, left + crop, top + crop))
    return normalize(img, mean, std)


def owl2_transform(img: Image.Image, size: int) -> np.ndarray:
    """mPLUG-Owl2 (image_aspect_ratio 'pad', training, evaluation and the demo): expand2square with the mean
    colour (int(mean * 255) per channel, as the release), then the CLIP processor at `size`."""
    return clip_preprocess(expand2square(img, tuple(int(m * 255) for m in CLIP_MEAN)), size)


def owl_v1_transform(img: Image.Image, size: int) -> np.ndarray:
    """mPLUG-Owl (pipeline DefaultProcessor; MplugOwlProcessor at inference): bicubic resize to (size, size)
    then normalise -- the CLIP processor's resize and crop are then no-ops."""
    return test_transform(img, size)


def owl_transform(version: int) -> Callable[[Image.Image, int], np.ndarray]:
    """The release's image preprocessing of mPLUG-Owl `version` (1 or 2)."""
    if version not in (1, 2):
        raise ValueError(f"mPLUG-Owl version must be 1 or 2, got {version}")
    return owl_v1_transform if version == 1 else owl2_transform
