"""The generated shapes dataset: determinism, picture-determined text, two domains, vocabulary."""

import numpy as np
import pytest

from aurora_jax.data import shapes, transforms


def test_deterministic_and_index_addressable():
    a = list(shapes.generate(5, image_size=32, seed=1))
    b = list(shapes.generate(3, image_size=32, seed=1))
    assert a[:3] == b  # sample i does not depend on how many are generated
    assert shapes.make_sample(4, image_size=32, seed=1) == a[4]
    assert a[0]["image"] != shapes.make_sample(0, image_size=32, seed=2)["image"]
    assert a[0]["image"] != shapes.make_sample(0, split="test", image_size=32, seed=1)["image"]


@pytest.mark.parametrize("domain", ["pretrain", "downstream"])
def test_text_follows_the_picture(domain):
    for rec in shapes.generate(30, domain=domain, image_size=48, seed=0):
        objs = rec["objects"]
        n = len(objs["shape"])
        assert 1 <= n <= 3 and transforms.decode_image(rec["image"]).size == (48, 48)
        cells = list(zip(objs["row"], objs["col"], strict=True))
        assert cells == sorted(cells) and len(set(cells)) == n  # reading order, no overlap
        for caption in rec["captions"]:
            for shape, color in zip(objs["shape"], objs["color"], strict=True):
                assert f"{color} {shape}" in caption
        qa = dict(zip(rec["questions"]["question"], rec["answers"], strict=True))
        assert qa["how many shapes are there?"] == str(n)
        for q, a in qa.items():
            if q.startswith("what color is the "):
                shape = q[len("what color is the ") : -1]
                assert objs["color"][objs["shape"].index(shape)] == a
            elif q.startswith("is there "):
                assert a == ("yes" if q.split()[-1][:-1] in objs["shape"] else "no")


def test_two_captions_for_two_shapes_relations():
    for rec in shapes.generate(40, image_size=32):
        objs = rec["objects"]
        if len(objs["shape"]) == 2:
            first, second = rec["captions"]
            if objs["row"][0] != objs["row"][1]:
                assert " above " in first and " below " in second
            else:
                assert " to the left of " in first and " to the right of " in second


def test_domains_differ_in_look_and_style():
    pre = shapes.make_sample(0, domain="pretrain", image_size=32)
    down = shapes.make_sample(0, domain="downstream", image_size=32)
    corner = lambda r: np.asarray(transforms.decode_image(r["image"]))[:3, :3].mean()  # noqa: E731
    assert corner(pre) > 180 > 80 > corner(down)  # light vs dark background
    assert all(c.startswith("there ") for c in down["captions"])
    assert not any(c.startswith("there ") for c in pre["captions"])


def test_vocabulary_covers_all_text(tokenizer):
    texts = []
    for domain in shapes.DOMAINS:
        for rec in shapes.generate(40, domain=domain, image_size=16):
            texts += rec["captions"] + rec["questions"]["question"] + rec["answers"]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}


def test_bad_arguments():
    with pytest.raises(ValueError):
        next(shapes.generate(1, domain="mars"))
    with pytest.raises(ValueError):
        next(shapes.generate(1, split="validation"))
