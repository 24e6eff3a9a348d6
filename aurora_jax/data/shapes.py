"""A generated image-text dataset of simple shapes, for the demo and the tests (no tfds needed here).

Each picture holds 1-3 shapes on a 3 x 3 grid; its captions and its question/answer pairs are
determined by the picture. Two domains share the word vocabulary but differ in look and caption
style, so a small BLIP can be pre-trained on one and tuned on the other:
- "pretrain": bright colours, light background, filled shapes, captions "a red circle above a blue square";
- "downstream": darker shades, dark noisy background, outlined shapes, captions "there is a red circle ...".
Samples are a pure function of (seed, domain, split, index).
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
SPLITS = ("train", "test")
GRID = 3
QUESTIONS_PER_IMAGE = 3
_NUMBER_WORDS = ("zero", "one", "two", "three")


@dataclasses.dataclass(frozen=True)
class Domain:
    """Appearance and caption style of one distribution."""

    name: str
    palette: dict[str, tuple[int, int, int]]  # colour word -> RGB
    background: tuple[int, int, int]
    noise: float  # std of the background pixel noise
    outline: bool  # draw outlines instead of filled shapes
    caption_prefix: str  # "" or "there is " / "there are ..." style


DOMAINS = {
    "pretrain": Domain(
        name="pretrain",
        palette={
            "red": (220, 40, 40),
            "green": (40, 170, 60),
            "blue": (40, 80, 220),
            "yellow": (235, 205, 40),
        },
        background=(236, 236, 236),
        noise=4.0,
        outline=False,
        caption_prefix="",
    ),
    "downstream": Domain(
        name="downstream",
        palette={
            "red": (170, 20, 60),
            "green": (90, 200, 120),
            "blue": (70, 140, 255),
            "yellow": (250, 240, 120),
        },
        background=(34, 36, 52),
        noise=14.0,
        outline=True,
        caption_prefix="there is ",
    ),
}
_DOMAIN_IDS = {"pretrain": 0, "downstream": 1}
_SPLIT_IDS = {"train": 0, "test": 1}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    row: int
    col: int


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: ShapeObject) -> str:
    return f"{_article(obj.color)} {obj.color} {obj.shape}"


def _relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where a is relative to b; vertical relations win when both rows and columns differ."""
    if a.row != b.row:
        return "above" if a.row < b.row else "below"
    return "to the left of" if a.col < b.col else "to the right of"


def captions_for(objects: list[ShapeObject], domain: Domain) -> list[str]:
    """All captions that describe the picture (objects are in reading order)."""
    if len(objects) == 1:
        return [f"{domain.caption_prefix}{_phrase(objects[0])}"]
    if len(objects) == 2:
        a, b = objects
        return [
            f"{domain.caption_prefix}{_phrase(a)} {_relation(a, b)} {_phrase(b)}",
            f"{domain.caption_prefix}{_phrase(b)} {_relation(b, a)} {_phrase(a)}",
        ]
    listed = ", ".join(_phrase(o) for o in objects[:-1]) + f" and {_phrase(objects[-1])}"
    if domain.caption_prefix:
        return [f"there are {_NUMBER_WORDS[len(objects)]} shapes: {listed}"]
    return [listed]


def questions_for(objects: list[ShapeObject], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Three (question, answer) pairs whose answers follow from the picture: count, colour, existence."""
    qa = [("how many shapes are there?", str(len(objects)))]
    kinds = [o.shape for o in objects]
    unique = [o for o in objects if kinds.count(o.shape) == 1]
    if unique:
        target = unique[int(rng.integers(len(unique)))]
        qa.append((f"what color is the {target.shape}?", target.color))
    else:  # every shape type repeats: ask for a count instead
        shape = kinds[0]
        qa.append((f"how many {shape}s are there?", str(kinds.count(shape))))
    # Existence: half of the time ask about a present shape so "yes" and "no" are balanced.
    shape = (
        kinds[int(rng.integers(len(kinds)))] if rng.random() < 0.5 else SHAPES[int(rng.integers(len(SHAPES)))]
    )
    qa.append((f"is there {_article(shape)} {shape}?", "yes" if shape in kinds else "no"))
    return qa


def sample_objects(rng: np.random.Generator, domain: Domain) -> list[ShapeObject]:
    """1-3 shapes in distinct grid cells, sorted in reading order (top to bottom, left to right)."""
    count = int(rng.integers(1, 4))
    cells = sorted(rng.choice(GRID * GRID, size=count, replace=False).tolist())
    colors = list(domain.palette)
    return [
        ShapeObject(
            SHAPES[int(rng.integers(len(SHAPES)))],
            colors[int(rng.integers(len(colors)))],
            c // GRID,
            c % GRID,
        )
        for c in cells
    ]


def render(objects: list[ShapeObject], domain: Domain, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the shapes at twice the resolution and downsample (cheap anti-aliasing)."""
    big = 2 * size
    noise = rng.normal(0.0, domain.noise, size=(big, big, 1))
    background = np.clip(np.asarray(domain.background, np.float32) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(img)
    cell = big / GRID
    for obj in objects:
        radius = cell * rng.uniform(0.26, 0.36)
        cx = (obj.col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (obj.row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        jitter = rng.integers(-15, 16, size=3)
        color = tuple(int(v) for v in np.clip(np.asarray(domain.palette[obj.color]) + jitter, 0, 255))
        style = {"outline": color, "width": max(2, big // 32)} if domain.outline else {"fill": color}
        if obj.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), **style)
        elif obj.shape == "square":
            r = radius * 0.9
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), **style)
        else:  # triangle pointing up
            pts = [(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)]
            if domain.outline:
                draw.line(pts + [pts[0]], fill=color, width=style["width"], joint="curve")
            else:
                draw.polygon(pts, fill=color)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def make_sample(
    index: int, *, domain: str = "pretrain", split: str = "train", image_size: int = 64, seed: int = 0
) -> dict:
    """One record in the same layout as the `shapes` tfds builder (image as PNG bytes)."""
    dom = DOMAINS[domain]
    rng = np.random.default_rng([seed, _DOMAIN_IDS[domain], _SPLIT_IDS[split], index])
    objects = sample_objects(rng, dom)
    img = render(objects, dom, image_size, rng)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    qa = questions_for(objects, rng)
    return {
        "image": buf.getvalue(),
        "image_path": f"{domain}/{split}/{index:06d}.png",
        "image_id": f"{domain}-{split}-{index}",
        "image_index": index,
        "captions": captions_for(objects, dom),
        "questions": {
            "question_id": [index * QUESTIONS_PER_IMAGE + k for k in range(len(qa))],
            "question": [q for q, _ in qa],
            "dataset": ["shapes"] * len(qa),
            "num_answers": [1] * len(qa),
        },
        "answers": [a for _, a in qa],
        "answer_weights": [1.0] * len(qa),
        "objects": {
            "shape": [o.shape for o in objects],
            "color": [o.color for o in objects],
            "row": [o.row for o in objects],
            "col": [o.col for o in objects],
        },
    }


def generate(
    num_images: int, *, domain: str = "pretrain", split: str = "train", image_size: int = 64, seed: int = 0
) -> Iterator[dict]:
    """The first `num_images` samples of a split, in index order."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {sorted(DOMAINS)}")
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    for i in range(num_images):
        yield make_sample(i, domain=domain, split=split, image_size=image_size, seed=seed)


def vocabulary() -> list[str]:
    """Every word (BERT-style: punctuation split off) that captions, questions and answers can use."""
    texts = [
        "how many shapes are there? what color is the is there a an there are shapes: , and",
        "above below to the left of right",
        " ".join(COLORS),
        " ".join(SHAPES),
        " ".join(s + "s" for s in SHAPES),
        " ".join(_NUMBER_WORDS),
        "0 1 2 3 yes no",
    ]
    words = re.findall(r"\w+|[^\w\s]", " ".join(texts))
    return sorted(set(words))
