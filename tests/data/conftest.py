"""Shared fixtures for the data tests: tiny annotation folders in BLIP / LLaVA format, a word tokenizer."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from aurora_jax.data import shapes, text


def encoded_image(width: int, height: int, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    """A JPEG cut short: the header parses, the full decode fails."""
    return encoded_image(32, 24, seed=99)[:200]


def write(path: str, data: bytes | object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(data, bytes):
        with open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)


@pytest.fixture(scope="session")
def karpathy_dir(tmp_path_factory) -> str:
    """BLIP COCO Karpathy layout: 3 good train images (+1 corrupt), 2 good test images (+1 missing)."""
    root = str(tmp_path_factory.mktemp("coco_manual"))
    write(f"{root}/train2014/a.jpg", encoded_image(40, 30, seed=1))
    write(f"{root}/train2014/b.jpg", encoded_image(30, 40, seed=2))
    write(f"{root}/train2014/c.png", encoded_image(20, 20, "PNG", mode="L", seed=3))  # greyscale
    write(f"{root}/train2014/bad.jpg", corrupt_jpeg())
    write(f"{root}/val2014/d.jpg", encoded_image(24, 24, seed=4))
    write(f"{root}/val2014/e.jpg", encoded_image(28, 20, seed=5))
    write(
        f"{root}/coco_karpathy_train.json",
        [
            {"image": "train2014/a.jpg", "caption": "A man riding a horse.", "image_id": "11"},
            {"image": "train2014/b.jpg", "caption": "Two dogs play!", "image_id": "12"},
            {"image": "train2014/a.jpg", "caption": "A person on a horse", "image_id": "11"},
            {"image": "train2014/bad.jpg", "caption": "broken picture", "image_id": "13"},
            {"image": "train2014/c.png", "caption": "a grey cat", "image_id": "14"},
        ],
    )
    write(
        f"{root}/coco_karpathy_test.json",
        [
            {"image": "val2014/d.jpg", "caption": ["one", "two", "three"]},
            {"image": "val2014/missing.jpg", "caption": ["lost", "gone"]},
            {"image": "val2014/e.jpg", "caption": ["four", "five"]},
        ],
    )
    return root


@pytest.fixture(scope="session")
def vqa_dir(tmp_path_factory) -> str:
    """BLIP VQA layout: 4 train questions on 2 images (+1 on a corrupt image), 1 VG, 2 test questions."""
    root = str(tmp_path_factory.mktemp("vqa_manual"))
    write(f"{root}/train2014/q1.jpg", encoded_image(32, 32, seed=6))
    write(f"{root}/train2014/q2.jpg", encoded_image(32, 32, seed=7))
    write(f"{root}/train2014/bad.jpg", corrupt_jpeg())
    write(f"{root}/vg/v1.jpg", encoded_image(32, 32, seed=8))
    write(f"{root}/test2015/t1.jpg", encoded_image(32, 32, seed=9))
    ten = ["yes"] * 6 + ["no"] * 3 + ["maybe"]
    write(
        f"{root}/vqa_train.json",
        [
            {
                "question_id": 1,
                "question": "Is it sunny?",
                "answer": ten,
                "image": "train2014/q1.jpg",
                "dataset": "vqa",
            },
            {
                "question_id": 2,
                "question": "How many cats?",
                "answer": ["2"] * 10,
                "image": "train2014/q2.jpg",
                "dataset": "vqa",
            },
            {
                "question_id": 3,
                "question": "What color?",
                "answer": ["red"] * 5 + ["blue"] * 5,
                "image": "train2014/q1.jpg",
                "dataset": "vqa",
            },
            {
                "question_id": 4,
                "question": "Broken?",
                "answer": ["yes"] * 10,
                "image": "train2014/bad.jpg",
                "dataset": "vqa",
            },
        ],
    )
    write(
        f"{root}/vg_qa.json",
        [
            {
                "question_id": 50,
                "question": "What is it?",
                "answer": "a tree",
                "image": "vg/v1.jpg",
                "dataset": "vg",
            },
        ],
    )
    write(
        f"{root}/vqa_test.json",
        [
            {"question_id": 100, "question": "Where?", "image": "test2015/t1.jpg"},
            {"question_id": 101, "question": "Why?", "image": "test2015/t1.jpg"},
        ],
    )
    write(f"{root}/answer_list.json", ["yes", "no", "2", "red"])
    return root


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> str:
    """LLaVA layout: one conversation with an image, one text-only, one with a corrupt image."""
    root = str(tmp_path_factory.mktemp("llava_manual"))
    write(f"{root}/images/x.jpg", encoded_image(32, 32, seed=10))
    write(f"{root}/images/bad.jpg", corrupt_jpeg())
    write(
        f"{root}/conversations.json",
        [
            {
                "id": "c1",
                "image": "x.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": "A red square."},
                    {"from": "human", "value": "Is it big?"},
                    {"from": "gpt", "value": "No."},
                ],
            },
            {
                "id": "c2",
                "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}],
            },
            {
                "id": "c3",
                "image": "bad.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nAnd this?"},
                    {"from": "gpt", "value": "Broken."},
                ],
            },
        ],
    )
    return root


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A real BERT tokenizer over the shapes words plus the fixture words, with BLIP's [DEC] / [ENC]."""
    folder = str(tmp_path_factory.mktemp("vocab"))
    extra = (
        "man riding horse person on two dogs play grey cat sunny how many cats color what it yes no".split()
    )
    text.write_word_vocab(shapes.vocabulary() + extra, folder)
    return text.load_blip_tokenizer(folder)


@pytest.fixture(scope="session")
def shape_records() -> list[dict]:
    return list(shapes.generate(12, domain="pretrain", split="train", image_size=32, seed=3))


@pytest.fixture(scope="session", autouse=True)
def _quiet_tfds():
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
