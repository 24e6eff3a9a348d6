"""Annotation grouping and the per-caption / per-question views."""

import pytest

from aurora_jax.data import records


def test_group_captions_both_blip_layouts():
    train = [
        {"image": "a.jpg", "caption": "x", "image_id": "7"},
        {"image": "b.jpg", "caption": "y", "image_id": "8"},
        {"image": "a.jpg", "caption": "z", "image_id": "7"},
    ]
    assert records.group_captions(train) == [
        {"image": "a.jpg", "image_id": "7", "captions": ["x", "z"]},
        {"image": "b.jpg", "image_id": "8", "captions": ["y"]},
    ]
    test = [{"image": "c.jpg", "caption": ["p", "q"]}]
    assert records.group_captions(test) == [{"image": "c.jpg", "image_id": "c.jpg", "captions": ["p", "q"]}]


def test_group_questions_weights():
    entries = [
        {
            "question_id": 1,
            "question": "q1",
            "answer": ["a", "a", "b", "a"],
            "image": "i.jpg",
            "dataset": "vqa",
        },
        {"question_id": 2, "question": "q2", "answer": "tree", "image": "i.jpg", "dataset": "vg"},
        {"question_id": 3, "question": "q3", "image": "j.jpg"},
    ]
    first, second = records.group_questions(entries)
    assert first["questions"] == {
        "question_id": [1, 2],
        "question": ["q1", "q2"],
        "dataset": ["vqa", "vg"],
        "num_answers": [2, 1],
    }
    assert first["answers"] == ["a", "b", "tree"]
    assert first["answer_weights"] == [0.75, 0.25, pytest.approx(0.2)]
    assert second["questions"]["num_answers"] == [0] and second["answers"] == []


def test_views_without_metadata():
    source = [{"image": b"1", "captions": ["a", "b"]}, {"image": b"2", "captions": [b"c"]}]
    pairs = records.CaptionPairs(source)
    assert len(pairs) == 3
    assert [(p["image_index"], p["caption"], p["caption_index"]) for p in pairs] == [
        (0, "a", 0),
        (0, "b", 1),
        (1, "c", 0),
    ]
    assert pairs[1:3][0]["caption"] == "b"
    with pytest.raises(IndexError):
        pairs[3]
    with pytest.raises(ValueError):
        records.CaptionPairs(source, [2])
    assert len(records.CaptionPairs([])) == 0
