"""Video builders on tiny annotation files in each real layout; clip pipelines; the generated moving shapes."""

import hashlib
import json
import os

import grain
import numpy as np
import pytest

from aurora_jax.data import examples, moving_shapes, pipeline, records, text, video
from aurora_jax.data.builders import (
    DidemoRetrieval,
    MovingShapes,
    MsrvttQa,
    MsrvttRetrieval,
    MsvdQa,
    build,
    msrvtt_retrieval_config,
    open_split,
)
from aurora_jax.data.records import AnnotationError

FAST = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _touch(root, *paths):
    for p in paths:
        os.makedirs(os.path.dirname(os.path.join(root, p)), exist_ok=True)
        open(os.path.join(root, p), "wb").close()  # builders only check that the video is there


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def _rows(split_data):
    return [split_data.source[i] for i in range(len(split_data.source))]


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def test_msrvtt_retrieval_layout(tmp_path):
    root = str(tmp_path / "MSRVTT")
    _touch(root, "videos/compress/video0.mp4", "videos/compress/video1.mp4", "videos/compress/video9.mp4")
    ann = f"{root}/txt_db/msrvtt_retrieval"
    _jsonl(f"{ann}/train.jsonl", [
        {"clip_name": "video0", "caption": "a man is singing", "sen_id": 0},
        {"clip_name": "video1", "caption": "a cat plays", "sen_id": 1},
        {"clip_name": "video0", "caption": "someone sings a song", "sen_id": 2},
        {"clip_name": "video5", "caption": "this clip is missing", "sen_id": 3},
    ])
    _jsonl(f"{ann}/test.jsonl", [{"clip_name": "video9", "caption": "a dog runs"}])
    b = build(MsrvttRetrieval, tmp_path / "data", root)
    train, test = open_split(b, "train"), open_split(b, "test")
    rows = _rows(train)
    assert [r["video"] for r in rows] == [b"videos/compress/video0.mp4", b"videos/compress/video1.mp4"]
    assert [r["video_index"] for r in rows] == [0, 1]
    assert [list(r["captions"]) for r in rows] == [[b"a man is singing", b"someone sings a song"], [b"a cat plays"]]
    assert train.per_split("num_captions") == [2, 1]
    assert train.num_corrupt == 1 and train.per_split("corrupt_files") == ["video5"]
    assert test.per_split("captions") == [["a dog runs"]] and test.num_corrupt == 0
    # Other file names (e.g. the 9k train / 1k-A test files of later repositories) through a config.
    os.rename(f"{ann}/test.jsonl", f"{ann}/test1ka.jsonl")
    other = build(MsrvttRetrieval, tmp_path / "data", root, config=msrvtt_retrieval_config(test="test1ka.jsonl"))
    assert other.builder_config.name == "train_test1ka"
    assert open_split(other, "test").per_split("captions") == [["a dog runs"]]
    pairs = video.ClipCaptionPairs(train.source, train.per_split("num_captions"))
    assert [(p["video"], p["image_index"], p["caption"]) for p in pairs] == [
        ("videos/compress/video0.mp4", 0, "a man is singing"),
        ("videos/compress/video0.mp4", 0, "someone sings a song"),
        ("videos/compress/video1.mp4", 1, "a cat plays"),
    ]


def test_didemo_joins_sentences_into_paragraphs_and_finds_any_extension(tmp_path):
    root = str(tmp_path / "didemo")
    _touch(root, "videos/a@N1_2.avi", "videos/b_x.mov", "videos/c/000001.jpg")
    _jsonl(f"{root}/train.jsonl", [
        {"clip_name": "a@N1_2", "caption": "A man walks in. "},
        {"clip_name": "b_x", "caption": ["the camera pans.", "a car passes."]},
        {"clip_name": "a@N1_2", "caption": "He sits down."},
        {"clip_name": "c", "caption": "frames only"},
    ])
    b = build(DidemoRetrieval, tmp_path / "data", root)
    rows = _rows(open_split(b, "train"))
    assert [(r["video"], list(r["captions"])) for r in rows] == [
        (b"videos/a@N1_2.avi", [b"A man walks in. He sits down."]),
        (b"videos/b_x.mov", [b"the camera pans. a car passes."]),
        (b"videos/c", [b"frames only"]),  # a folder of pre-extracted frames
    ]


def test_msrvtt_qa_layout_and_answer_list(tmp_path):
    root = str(tmp_path / "qa")
    _touch(root, "videos/video3.mp4", "videos/video4.mp4", "videos/video7020.mp4")
    _json(f"{root}/train_qa.json", [
        {"question": "what is a man doing?", "answer": "sing", "video_id": 3, "id": 0},
        {"question": "who is singing?", "answer": "man", "video_id": 3, "id": 1},
        {"question": "what plays?", "answer": "cat", "video_id": 4, "id": 2},
        {"question": "what is there?", "answer": "man", "video_id": 5, "id": 3},  # video5 missing
        {"question": "who plays?", "answer": "man", "video_id": 4, "id": 4},
    ])
    _json(f"{root}/test_qa.json", [{"question": "what runs?", "answer": "dog", "video_id": 7020, "id": 10}])
    b = build(MsrvttQa, tmp_path / "data", root)
    train, test = open_split(b, "train"), open_split(b, "test")
    rows = _rows(train)
    assert [(r["video"], r["video_index"], r["question_id"], list(r["answers"])) for r in rows] == [
        (b"videos/video3.mp4", 0, 0, [b"sing"]),
        (b"videos/video3.mp4", 0, 1, [b"man"]),
        (b"videos/video4.mp4", 1, 2, [b"cat"]),
        (b"videos/video4.mp4", 1, 4, [b"man"]),
    ]
    assert all(list(r["answer_weights"]) == [np.float32(0.05)] for r in rows)  # the release's fixed weight
    assert train.num_corrupt == 1 and train.per_split("corrupt_files") == ["video5"]
    # No answer-list file: train answers by frequency (the missing video's question counted, as in the file).
    assert train.metadata["answer_list"] == ["man", "sing", "cat"]
    assert test.per_split("answers") == ["dog"] and test.per_split("question_ids") == [10]
    item = examples.vqa_example(_tokenizer(tmp_path), train=True, max_answers=1)(rows[0], None)
    assert item["answer_weights"].tolist() == [np.float32(0.05)] and item["num_answers"] == 1


def test_msvd_qa_names_videos_through_the_mapping(tmp_path):
    root = str(tmp_path / "msvd")
    _touch(root, "YouTubeClips/-4wsuPCjDBc_5_15.avi", "YouTubeClips/abc_1_9.avi")
    with open(f"{root}/youtube_mapping.txt", "w") as f:
        f.write("-4wsuPCjDBc_5_15 vid1\nabc_1_9 vid2\n")
    _json(f"{root}/train_qa.json", [
        {"question": "who is cooking?", "answer": "woman", "video_id": 2, "id": 0},
        {"question": "what is sliced?", "answer": "onion", "video_id": 1, "id": 1},
    ])
    _json(f"{root}/answer_list.json", ["onion", "woman", "man"])
    b = build(MsvdQa, tmp_path / "data", root)
    train = open_split(b, "train")
    assert [(r["video"], r["video_id"], r["video_index"]) for r in _rows(train)] == [
        (b"YouTubeClips/abc_1_9.avi", b"vid2", 0),
        (b"YouTubeClips/-4wsuPCjDBc_5_15.avi", b"vid1", 1),
    ]
    assert train.metadata["answer_list"] == ["onion", "woman", "man"]


def test_bad_annotation_lines_name_the_file_and_line(tmp_path):
    root = str(tmp_path / "bad")
    ann = f"{root}/txt_db/msrvtt_retrieval/train.jsonl"
    _jsonl(ann, [{"clip_name": "video0", "caption": "ok"}, {"clip_name": "video1"}])
    with pytest.raises(AnnotationError, match=r"train.jsonl: line 2 has no \['caption'\]"):
        build(MsrvttRetrieval, tmp_path / "data", root)


# ----------------------------------------------------------------------------------------------
# Moving shapes
# ----------------------------------------------------------------------------------------------


def _tokenizer(tmp_path):
    folder = str(tmp_path / "vocab")
    if not os.path.exists(folder):
        text.write_word_vocab(moving_shapes.vocabulary() + "man sing cat".split(), folder)
    return text.load_blip_tokenizer(folder)


def test_moving_shapes_single_frames_do_not_tell_the_direction():
    rng = np.random.default_rng(0)
    clips = [moving_shapes.sample_clip(rng, 32, 8) for _ in range(800)]
    for clip in clips[:100]:  # two frames always tell the direction: the shape's shift on the torus
        frames = moving_shapes.render(clip, 32, 8)
        mask = np.all(frames == moving_shapes.PALETTE[clip.color], axis=-1)
        shift = [np.roll(mask[0], s, axis=a).__eq__(mask[1]).mean() for a, s in ((1, -2), (1, 2), (0, -2), (0, 2))]
        assert int(np.argmax(shift)) == moving_shapes.DIRECTIONS.index(clip.direction)
    # One frame: the start position (and so any frame's position, on the torus) has the same law for every
    # direction; the mean x of clips moving left and right agree up to sampling noise.
    xs = {d: np.asarray([c.start[0] for c in clips if c.direction == d]) for d in ("left", "right")}
    assert abs(xs["left"].mean() - xs["right"].mean()) < 2.0
    assert abs(np.median(xs["left"]) - 16) < 3 and abs(np.median(xs["right"]) - 16) < 3


def test_moving_shapes_files_are_deterministic_and_in_the_release_layouts(tmp_path):
    a = moving_shapes.write_moving_shapes(tmp_path / "a", num_train=6, num_test=4, frames=8, px=32, seed=3)
    moving_shapes.write_moving_shapes(tmp_path / "b", num_train=6, num_test=4, frames=8, px=32, seed=3)
    moving_shapes.write_moving_shapes(tmp_path / "c", num_train=6, num_test=4, frames=8, px=32, seed=4)

    def digest(root):
        h = hashlib.sha256()
        for dirpath, _, names in sorted(os.walk(root)):
            for n in sorted(names):
                h.update(n.encode() + open(os.path.join(dirpath, n), "rb").read())
        return h.hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    lines = [json.loads(x) for x in open(tmp_path / "a/txt_db/msrvtt_retrieval/test.jsonl")]
    assert [x["clip_name"] for x in lines] == ["video6", "video7", "video8", "video9"]
    clip = a["test"][0]
    assert lines[0]["caption"] == f"a {clip.color} {clip.shape} moving {clip.direction}"
    qa = json.load(open(tmp_path / "a/msrvtt_qa/test_qa.json"))
    assert [(q["video_id"], q["question"], q["answer"]) for q in qa[:3]] == [
        (6, "what color is the shape?", clip.color),
        (6, "what shape is it?", clip.shape),
        (6, "which way is the shape moving?", clip.direction),
    ]
    assert len({(c.shape, c.color, c.direction) for c in a["test"]}) == 4  # test combinations do not repeat
    frames = video.read_clip(str(tmp_path / "a/videos/video6.mp4"), 32, indices=range(8))
    assert np.abs(frames.astype(int) - moving_shapes.render(clip, 32, 8)).mean() < 5


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """18 train / 6 test clips with a corrupt train video, built through both moving_shapes configs."""
    root = tmp_path_factory.mktemp("moving")
    moving_shapes.write_moving_shapes(root / "files", num_train=18, num_test=6, frames=8, px=16, seed=0)
    (root / "files/videos/video4.mp4").write_bytes(b"corrupt" * 50)
    retrieval = build(MovingShapes, root / "data", root / "files", config="retrieval")
    qa = build(MovingShapes, root / "data", root / "files", config="qa")
    return str(root / "files"), retrieval, qa


def _clips(source, example_fn, root, **kw):
    args = dict(batch_size=4, video_root=root, num_frm=4, frame_size=16, seed=1, shard_index=0, shard_count=1,
                read_options=FAST)
    return pipeline.make_clip_dataset(source, example_fn, **{**args, **kw})


def test_retrieval_batches_skip_corrupt_clips_and_resume(shapes_root, tmp_path):
    root, retrieval, _ = shapes_root
    train = open_split(retrieval, "train")
    pairs = video.ClipCaptionPairs(train.source, train.per_split("num_captions"))
    assert len(pairs) == 36  # two captions per train clip
    fn = examples.caption_example(_tokenizer(tmp_path), max_words=40, max_length=12)
    it = iter(_clips(pairs, fn, root, train=True, num_epochs=1))
    batches = list(it)
    b = batches[0]
    assert b["video"].shape == (4, 4, 16, 16, 3) and b["video"].dtype == np.float32
    assert b["text_ids"].shape == b["text_mask"].shape == (4, 12) and b["image_index"].dtype == np.int32
    kept = sorted(int(i) for b in batches for i in b["image_index"])
    assert 4 not in kept and len(batches) == 34 // 4 and pipeline.num_skipped(it) == 2  # both captions of video4
    # Checkpoint mid-stream: a restored iterator yields the same batches and keeps the skip count.
    ds_kw = dict(train=True, num_epochs=2)
    it = iter(_clips(pairs, fn, root, **ds_kw))
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)
    expected = [next(it) for _ in range(4)]
    restored = iter(_clips(pairs, fn, root, **ds_kw))
    restored.set_state(state)
    got = [next(restored) for _ in range(4)]
    for e, g in zip(expected, got, strict=True):
        for k in e:
            np.testing.assert_array_equal(e[k], g[k], err_msg=k)
    assert pipeline.num_skipped(restored) == pipeline.num_skipped(it) >= 1


def test_clip_values_are_the_normalised_decoded_frames(shapes_root):
    root, retrieval, _ = shapes_root
    test = open_split(retrieval, "test")
    batches = list(_clips(test.source, examples.clip_example(), root, train=False, batch_size=6))
    assert len(batches) == 1 and batches[0]["image_index"].tolist() == list(range(6))
    rng = np.random.default_rng([1, 0, 2])  # eval: epoch 0, source index 2
    frames = video.read_clip(os.path.join(root, "videos/video20.mp4"), 16, num_frm=4, strategy="rand", rng=rng)
    from aurora_jax.data.transforms import normalize

    np.testing.assert_allclose(batches[0]["video"][2], normalize(frames), rtol=0, atol=1e-6)


def test_clip_shards_are_disjoint_and_cover(shapes_root):
    root, retrieval, _ = shapes_root
    test = open_split(retrieval, "test")

    def host(i, count, train):
        return list(_clips(test.source, examples.clip_example(), root, train=train, batch_size=1, num_epochs=1,
                           shard_index=i, shard_count=count))

    evals = [host(i, 4, False) for i in range(4)]
    seen = [int(b["image_index"][0]) for h in evals for b in h if b["valid"][0]]
    assert sorted(seen) == list(range(6)) and {len(h) for h in evals} == {2}
    trains = [{int(b["image_index"][0]) for b in host(i, 3, True)} for i in range(3)]
    assert all(len(s) == 2 for s in trains) and set().union(*trains) == set(range(6))


def test_qa_batches_and_corrupt_eval_rows(shapes_root, tmp_path):
    root, _, qa = shapes_root
    tok = _tokenizer(tmp_path)
    train, test = open_split(qa, "train"), open_split(qa, "test")
    assert len(train.source) == 54
    vocab = set(moving_shapes.COLORS + moving_shapes.SHAPES + moving_shapes.DIRECTIONS)
    assert set(train.metadata["answer_list"]) == vocab and len(train.metadata["answer_list"]) == len(vocab)
    it = iter(_clips(train.source, examples.vqa_example(tok, train=True, max_answers=1), root, train=True,
                     num_epochs=1))
    batches = list(it)
    b = batches[0]
    assert b["video"].shape == (4, 4, 16, 16, 3)
    assert b["question_ids"].shape == (4, 35) and b["answer_ids"].shape == (4, 1, 10)
    assert b["answer_weights"].tolist() == [[np.float32(0.05)]] * 4 and b["num_answers"].tolist() == [1] * 4
    assert pipeline.num_skipped(it) == 3 and len(batches) == 51 // 4  # three questions on the corrupt video4
    # Evaluation keeps a corrupt clip's rows with valid 0 (static shapes), and counts them.
    source = [dict(train.source[i]) for i in range(12, 15)]  # video4's questions
    it = iter(_clips(source, examples.vqa_example(tok, train=False), root, train=False, batch_size=3))
    (b,) = list(it)
    assert b["valid"].tolist() == [0, 0, 0] and not b["video"].any() and pipeline.num_skipped(it) == 3
    assert b["question_id"].tolist() == [12, 13, 14]
    ev = list(_clips(test.source, examples.vqa_example(tok, train=False), root, train=False, batch_size=6))
    assert sum(int(b["valid"].sum()) for b in ev) == 18
    assert test.per_split("answers") == [r["answers"][0].decode() for r in _rows(test)]
    texts, txt2img, _ = records.flatten_captions(open_split(shapes_root[1], "test").per_split("captions"))
    assert len(texts) == 6 and txt2img.tolist() == list(range(6))
