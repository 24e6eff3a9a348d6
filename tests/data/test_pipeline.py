"""grain pipelines: batches, checkpoint round-trip, reproducibility, per-host sharding, corrupt images."""

import json

import grain
import numpy as np
import pytest

from aurora_jax.data import examples, pipeline, records
from aurora_jax.data.builders import LlavaConversations, Shapes, build, open_split, shapes_config
from tests.data.conftest import corrupt_jpeg

FAST = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _indices(ds) -> list[int]:
    return [int(i) for b in ds for i, v in zip(b["image_index"], b["valid"], strict=True) if v]


def test_train_batches_and_state_round_trip(shape_records, tokenizer):
    pairs = records.CaptionPairs(shape_records)
    kwargs = dict(
        batch_size=4, image_size=24, train=True, seed=5, shard_index=0, shard_count=1, read_options=FAST
    )
    ds = pipeline.make_dataset(pairs, examples.caption_example(tokenizer, max_length=16), **kwargs)
    it = iter(ds)
    first = _take(it, 3)
    b = first[0]
    assert b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.float32
    assert b["text_ids"].shape == (4, 16) and b["text_ids"].dtype == np.int32
    assert b["text_mask"].dtype == np.int32 and b["image_index"].dtype == np.int32
    assert b["valid"].tolist() == [1] * 4 and pipeline.num_skipped(it) == 0
    state = it.get_state()
    json.dumps(state)  # orbax stores iterator states as JSON
    expected = _take(it, 6)  # runs past the end of the first epoch (len(pairs) // 4 batches)
    assert len(pairs) // 4 < 3 + 6
    restored = iter(
        pipeline.make_dataset(pairs, examples.caption_example(tokenizer, max_length=16), **kwargs)
    )
    restored.set_state(state)
    _assert_same(_take(restored, 6), expected)
    # A fresh pipeline with more loader threads reproduces the same stream from the start.
    again = pipeline.make_dataset(
        pairs,
        examples.caption_example(tokenizer, max_length=16),
        **{**kwargs, "read_options": grain.ReadOptions(num_threads=3)},
    )
    _assert_same(_take(iter(again), 3), first)


def test_epochs_reshuffle_and_reaugment(shape_records):
    ds = pipeline.make_dataset(
        shape_records,
        examples.image_example(),
        batch_size=4,
        image_size=16,
        train=True,
        seed=1,
        num_epochs=2,
        shard_index=0,
        shard_count=1,
        read_options=FAST,
    )
    batches = list(ds)
    assert len(batches) == 6
    order = [int(i) for b in batches for i in b["image_index"]]
    assert sorted(order[:12]) == sorted(order[12:]) == list(range(12))
    assert order[:12] != order[12:]
    by_index = [{int(i): img for i, img in zip(b["image_index"], b["image"], strict=True)} for b in batches]
    epoch0 = {k: v for d in by_index[:3] for k, v in d.items()}
    epoch1 = {k: v for d in by_index[3:] for k, v in d.items()}
    assert not np.array_equal(epoch0[0], epoch1[0])  # new augmentation each epoch


def test_per_host_sharding(shape_records):
    def host(i, count, train):
        return pipeline.make_dataset(
            shape_records,
            examples.image_example(),
            batch_size=2,
            image_size=8,
            train=train,
            seed=3,
            num_epochs=1,
            shard_index=i,
            shard_count=count,
            read_options=FAST,
        )

    # Training: equal disjoint shares, the remainder dropped so every host runs the same number of steps.
    shares = [_indices(host(i, 5, True)) for i in range(5)]
    assert [len(s) for s in shares] == [2] * 5
    assert len(set().union(*map(set, shares))) == 10
    # Evaluation: every example exactly once over the hosts, every host the same number of full batches.
    hosts = [list(host(i, 5, False)) for i in range(5)]
    assert {len(h) for h in hosts} == {pipeline.steps_per_epoch(12, 2, train=False, shard_count=5)} == {2}
    seen = sorted(i for h in hosts for i in _indices(h))
    assert seen == list(range(12))
    assert [int(sum(b["valid"].sum() for b in h)) for h in hosts] == [3, 3, 2, 2, 2]


def test_default_shard_is_the_jax_process():
    assert pipeline.host_shard(None, None) == (0, 1)
    with pytest.raises(ValueError):
        pipeline.host_shard(2, 2)


def test_corrupt_images_are_skipped_and_counted(shape_records):
    source = [dict(r) for r in shape_records]
    for i in (2, 7):
        source[i]["image"] = corrupt_jpeg()
    train = pipeline.make_dataset(
        source,
        examples.image_example(),
        batch_size=5,
        image_size=8,
        train=True,
        seed=0,
        num_epochs=1,
        shard_index=0,
        shard_count=1,
        read_options=FAST,
    )
    it = iter(train)
    batches = list(it)
    kept = [int(i) for b in batches for i in b["image_index"]]
    assert len(batches) == 2 and sorted(kept) == [i for i in range(12) if i not in (2, 7)]
    assert pipeline.num_skipped(it) == 2
    restored = iter(train)
    restored.set_state(it.get_state())
    assert pipeline.num_skipped(restored) == 2
    # Evaluation keeps the row (image indices stay aligned) but marks it invalid.
    it = iter(
        pipeline.make_dataset(
            source,
            examples.image_example(),
            batch_size=4,
            image_size=8,
            train=False,
            shard_index=0,
            shard_count=1,
        )
    )
    rows = {int(i): int(v) for b in it for i, v in zip(b["image_index"], b["valid"], strict=True)}
    assert rows == {i: int(i not in (2, 7)) for i in range(12)}
    assert pipeline.num_skipped(it) == 2


def test_vqa_from_tfds_source(tmp_path, tokenizer):
    builder = build(Shapes, tmp_path, config=shapes_config(num_train=4, num_test=2, image_size=16))
    split = open_split(builder, "train")
    items = records.QuestionItems(split.source, split.per_split("num_questions"))
    fn = examples.vqa_example(tokenizer, train=True, question_length=12, answer_length=4, max_answers=3)
    b = next(
        iter(
            pipeline.make_dataset(
                items,
                fn,
                batch_size=4,
                image_size=16,
                train=True,
                shard_index=0,
                shard_count=1,
                read_options=FAST,
            )
        )
    )
    assert b["question_ids"].shape == (4, 12) and b["answer_ids"].shape == (4, 3, 4)
    assert b["answer_weights"].dtype == np.float32 and b["answer_weights"].shape == (4, 3)
    np.testing.assert_array_equal(b["answer_weights"][:, 1:], 0)  # one answer each, padding rows weigh 0
    assert (b["num_answers"] == 1).all() and (b["answer_mask"][:, 1:] == 0).all()
    test = open_split(builder, "test")
    fn = examples.vqa_example(tokenizer, train=False, question_length=12)
    batches = list(
        pipeline.make_dataset(
            records.QuestionItems(test.source),
            fn,
            batch_size=4,
            image_size=16,
            train=False,
            shard_index=0,
            shard_count=1,
        )
    )
    assert [b["question_id"][:2].tolist() for b in batches][0] == [0, 1] and len(batches) == 2


def test_conversations_batch(llava_dir, tmp_path, tokenizer):
    split = open_split(build(LlavaConversations, tmp_path, manual_dir=llava_dir), "train")
    fn = examples.conversation_example(tokenizer, max_length=96, bos_id=2, eos_id=3)
    (b,) = list(
        pipeline.make_dataset(
            split.source, fn, batch_size=2, image_size=16, train=False, shard_index=0, shard_count=1
        )
    )
    assert b["input_ids"].shape == (2, 96) and b["loss_mask"].dtype == np.int32
    assert b["has_image"].tolist() == [1, 0] and b["valid"].tolist() == [1, 1]
    assert ((b["input_ids"] == -200).sum(axis=1) == [1, 0]).all()
    np.testing.assert_array_equal(b["image"][1], 0)  # text-only conversation: blank image
