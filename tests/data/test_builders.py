"""tfds builders on tiny folders in the real formats: examples, metadata, corrupt images, no TensorFlow."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from aurora_jax.data import records, transforms
from aurora_jax.data.builders import (
    CocoKarpathy,
    Flickr30kKarpathy,
    LlavaConversations,
    Shapes,
    VqaV2,
    build,
    open_split,
    shapes_config,
)
from aurora_jax.data.text import as_text

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def coco(karpathy_dir, tmp_path_factory):
    return build(CocoKarpathy, tmp_path_factory.mktemp("tfds"), manual_dir=karpathy_dir)


@pytest.fixture(scope="module")
def vqa(vqa_dir, tmp_path_factory):
    return build(VqaV2, tmp_path_factory.mktemp("tfds"), manual_dir=vqa_dir)


def test_coco_karpathy_train(coco):
    assert coco.info.file_format.value == "array_record"
    train = open_split(coco, "train")
    assert len(train.source) == 3 and train.num_corrupt == 1
    assert train.per_split("corrupt_files") == ["train2014/bad.jpg"]
    rec = train.source[0]
    assert set(rec) == {"image", "image_path", "image_id", "image_index", "captions"}
    assert isinstance(rec["image"], bytes) and transforms.decode_image(rec["image"]).size == (40, 30)
    assert [as_text(c) for c in rec["captions"]] == ["A man riding a horse.", "A person on a horse"]
    assert [int(train.source[i]["image_index"]) for i in range(3)] == [0, 1, 2]  # generation order kept
    assert as_text(train.source[2]["image_id"]) == "14"
    # BLIP's per-caption training order, from the metadata counts (no scan).
    pairs = records.CaptionPairs(train.source, train.per_split("num_captions"))
    assert len(pairs) == 4
    assert [(p["image_index"], p["caption"]) for p in pairs][1:3] == [
        (0, "A person on a horse"),
        (1, "Two dogs play!"),
    ]


def test_coco_karpathy_test_keeps_retrieval_mapping(coco, tmp_path):
    test = open_split(coco, "test")
    assert len(test.source) == 2 and test.num_corrupt == 1  # the missing file is skipped and counted
    texts, txt2img, img2txt = records.flatten_captions(test.per_split("captions"))
    assert texts == ["one", "two", "three", "four", "five"]
    np.testing.assert_array_equal(txt2img, [0, 0, 0, 1, 1])
    assert img2txt == [[0, 1, 2], [3, 4]]
    assert records.flatten_captions(records.captions_of(test.source))[0] == texts
    # The prepared folder reads back without the builder class (as a training job would).
    again = open_split(coco.data_dir, "test")
    assert len(again.source) == 2 and again.per_split("num_captions") == [3, 2]
    assert "val" not in coco.info.splits  # no val file: no val split


def test_flickr30k_karpathy(karpathy_dir, tmp_path):
    manual = tmp_path / "flickr"
    manual.mkdir()
    for sub in ("train2014", "val2014"):
        os.symlink(os.path.join(karpathy_dir, sub), manual / sub)
    for split in ("train", "test"):
        source = os.path.join(karpathy_dir, f"coco_karpathy_{split}.json")
        os.symlink(source, manual / f"flickr30k_{split}.json")
    builder = build(Flickr30kKarpathy, tmp_path / "tfds", manual_dir=manual)
    assert builder.name == "flickr30k_karpathy" and set(builder.info.splits) == {"train", "test"}
    assert open_split(builder, "test").per_split("num_captions") == [3, 2]


def test_vqa_v2(vqa):
    assert vqa.info.metadata["answer_list"] == ["yes", "no", "2", "red"]
    train = open_split(vqa, "train")
    assert len(train.source) == 2 and train.num_corrupt == 1
    items = records.QuestionItems(train.source, train.per_split("num_questions"))
    assert len(items) == 3
    first = items[0]
    assert set(first) == {
        "image",
        "image_index",
        "question_id",
        "question",
        "dataset",
        "answers",
        "answer_weights",
    }
    assert first["question_id"] == 1 and first["answers"] == ["yes", "no", "maybe"]
    np.testing.assert_allclose(first["answer_weights"], [0.6, 0.3, 0.1], rtol=1e-6)
    assert items[1]["question_id"] == 3 and items[1]["image_index"] == 0  # grouped with its image
    np.testing.assert_allclose(items[1]["answer_weights"], [0.5, 0.5])
    assert items[2]["answers"] == ["2"] and items[2]["image_index"] == 1
    vg = records.QuestionItems(open_split(vqa, "vg").source)
    assert vg[0]["answers"] == ["a tree"] and vg[0]["answer_weights"] == [pytest.approx(0.2)]
    test = records.QuestionItems(open_split(vqa, "test").source)
    assert [t["question_id"] for t in test] == [100, 101] and test[0]["answers"] == []


def test_shapes_builder_matches_python_generator(tmp_path):
    from aurora_jax.data import shapes

    builder = build(
        Shapes, tmp_path, config=shapes_config("downstream", num_train=6, num_test=3, image_size=24)
    )
    train = open_split(builder, "train")
    assert len(train.source) == 6 and len(open_split(builder, "test").source) == 3
    rec = train.source[4]
    ref = shapes.make_sample(4, domain="downstream", split="train", image_size=24)
    assert rec["image"] == ref["image"]
    assert [as_text(c) for c in rec["captions"]] == ref["captions"]
    assert [as_text(q) for q in rec["questions"]["question"]] == ref["questions"]["question"]
    assert [as_text(c) for c in rec["objects"]["color"]] == ref["objects"]["color"]
    assert train.per_split("num_questions") == [3] * 6 and train.num_corrupt == 0
    assert len(records.QuestionItems(train.source, train.per_split("num_questions"))) == 18


def test_llava_conversations(llava_dir, tmp_path):
    builder = build(LlavaConversations, tmp_path, manual_dir=llava_dir)
    train = open_split(builder, "train")
    assert len(train.source) == 2 and train.num_corrupt == 1
    first, second = train.source[0], train.source[1]
    assert set(first) == {"id", "image", "image_path", "has_image", "conversations"}
    assert as_text(first["id"]) == "c1" and bool(first["has_image"])
    assert [as_text(v) for v in first["conversations"]["from"]] == ["human", "gpt", "human", "gpt"]
    assert as_text(first["conversations"]["value"][0]) == "<image>\nWhat is shown?"
    assert not bool(second["has_image"]) and second["image"] == b""


def test_missing_annotations_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_karpathy_train.json"):
        build(CocoKarpathy, tmp_path / "out", manual_dir=tmp_path)


def test_runs_with_tensorflow_blocked(tmp_path):
    """Build, read and batch in a fresh interpreter where importing TensorFlow fails."""
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, sys

        attempts = []

        class BrokenTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            # TensorFlow looks installed to probes, but actually importing it fails (and is recorded).

            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    return importlib.machinery.ModuleSpec(name, self)
                return None

            def create_module(self, spec):
                attempts.append(spec.name)
                raise ImportError("TensorFlow is blocked in this test")

            def exec_module(self, module):
                raise ImportError("TensorFlow is blocked in this test")

        sys.meta_path.insert(0, BrokenTensorFlow())
        import aurora_jax.data
        from aurora_jax.data import examples, records, shapes, text, transforms  # noqa: F401
        assert "grain" not in sys.modules and "tensorflow_datasets" not in sys.modules, "eager heavy import"

        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()
        from aurora_jax.data import pipeline
        from aurora_jax.data.builders import Shapes, build, open_split, shapes_config

        config = shapes_config(num_train=4, num_test=2, image_size=16)
        builder = build(Shapes, {str(tmp_path)!r}, config=config)
        split = open_split(builder.data_dir, "train")
        ds = pipeline.make_dataset(records.QuestionItems(split.source), lambda r, rng: {{}}, batch_size=2,
                                   image_size=16, train=True, shard_index=0, shard_count=1)
        batch = next(iter(ds))
        assert batch["image"].shape == (2, 16, 16, 3)
        loaded = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
        assert not loaded and not attempts, (loaded, attempts)
        print("OK")
    """)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_no_tensorflow_in_this_process(coco):
    open_split(coco, "train").source[0]
    assert not [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]


@pytest.mark.parametrize("broken,needle", [
    ('[{"image": "train2014/a.jpg", "caption": "ok"}, {"image": "train2014/b.jpg"}]',
     r"entry 1 \(train2014/b.jpg\) has no \['caption'\]"),
    ('[{"image": "train2014/a.jpg", "caption": "ok"},', "invalid JSON at line 1"),
])
def test_bad_annotation_file_names_the_file_and_the_entry(karpathy_dir, tmp_path, broken, needle):
    manual = tmp_path / "coco"
    manual.mkdir()
    for sub in ("train2014", "val2014"):
        os.symlink(os.path.join(karpathy_dir, sub), manual / sub)
    os.symlink(os.path.join(karpathy_dir, "coco_karpathy_test.json"), manual / "coco_karpathy_test.json")
    (manual / "coco_karpathy_train.json").write_text(broken)
    with pytest.raises(records.AnnotationError, match=needle) as e:
        build(CocoKarpathy, tmp_path / "tfds", manual_dir=manual)
    assert "coco_karpathy_train.json" in str(e.value)
