"""Video datasets in the release's annotation layouts, read from manual_dir; records hold video paths, not frames.

Frames are decoded at load time (`aurora_jax.data.video.read_clip`), so a record's `video` is the
path of a video file or of a folder of frame images, relative to manual_dir. A video missing at
build time is skipped and counted (metadata num_corrupt / corrupt_files[split]); one that exists but
does not decode is skipped and counted by the pipeline.

Retrieval (msrvtt_retrieval, didemo_retrieval, moving_shapes/retrieval): ClipBERT's
`txt_db/<name>/{train,val,test}.jsonl`, one JSON object per line with "clip_name" and "caption" (the
fields the release reads), video file `<video_dir>/<clip_name><ext>`. MSRVTT's test.jsonl is the 1k-A
split (1,000 clips, one caption each). One example per video: video, video_id, video_index (position in
the split), captions. DiDeMo is paragraph-to-video: a video's sentences joined with spaces, in file
order, into its one caption. Metadata: num_captions[split]; captions[split] for val/test.

QA (msrvtt_qa, msvd_qa, moving_shapes/qa): the MSRVTT-QA / MSVD-QA files `{train,val,test}_qa.json`,
lists of {"video_id": int, "question", "answer", "id"} as the release's videovqa dataset reads them;
MSRVTT-QA videos are `video<video_id>.mp4`, MSVD-QA videos are named through youtube_mapping.txt
("<youtube clip> vid<video_id>" per line). One example per question: video, video_id, video_index,
question_id, question, answers ([answer]), answer_weights ([0.05], the release's fixed weight).
Metadata: answer_list (answer_list.json, or ClipBERT's train_ans2label.json keys, else the train
answers by decreasing frequency); answers[split] and question_ids[split] for val/test.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from aurora_jax.data.builders.common import ManualFilesBuilder, base_info, set_split_metadata, split_files
from aurora_jax.data.moving_shapes import QA_DIR, RETRIEVAL_DIR, VIDEO_DIR
from aurora_jax.data.records import AnnotationError, load_json

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".3gp", ".flv")
RELEASE_QA_WEIGHT = 0.05  # the release's videovqa dataset weighs its single answer 0.05


@dataclasses.dataclass
class VideoRetrievalConfig(tfds.core.BuilderConfig):
    files: tuple[tuple[str, str], ...] = ()  # (split, jsonl path relative to manual_dir)
    video_dir: str = "videos"
    video_exts: tuple[str, ...] = (".mp4",)  # tried in order; a folder <video_dir>/<clip_name> is frames
    paragraph: bool = False  # DiDeMo: one caption per video, its sentences joined


@dataclasses.dataclass
class VideoQaConfig(tfds.core.BuilderConfig):
    files: tuple[tuple[str, str], ...] = (("train", "train_qa.json"), ("val", "val_qa.json"), ("test", "test_qa.json"))
    video_dir: str = "videos"
    video_name: str = "video{video_id}"  # file stem, formatted with the entry's video_id
    video_exts: tuple[str, ...] = (".mp4",)
    mapping: str = ""  # optional "<file stem> <video_name>" lines (MSVD-QA's youtube_mapping.txt)
    answer_list: tuple[str, ...] = ("answer_list.json", "train_ans2label.json")
    answer_weight: float = RELEASE_QA_WEIGHT


def _split_jsonl(prefix: str, splits: Iterable[str] = ("train", "val", "test")) -> tuple[tuple[str, str], ...]:
    return tuple((s, f"{prefix}/{s}.jsonl" if prefix else f"{s}.jsonl") for s in splits)


MSRVTT_RETRIEVAL = VideoRetrievalConfig(
    name="default", files=_split_jsonl("txt_db/msrvtt_retrieval"), video_dir="videos/compress"
)


def msrvtt_retrieval_config(
    train: str = "train.jsonl",
    test: str = "test.jsonl",
    *,
    ann_dir: str = "txt_db/msrvtt_retrieval",
    video_dir: str = "videos/compress",
    name: str | None = None,
) -> VideoRetrievalConfig:
    """An MSRVTT config for other annotation file names (e.g. train9k.jsonl / test1ka.jsonl)."""
    stem = lambda f: os.path.splitext(f)[0]
    return VideoRetrievalConfig(
        name=name or f"{stem(train)}_{stem(test)}",
        files=(("train", f"{ann_dir}/{train}"), ("test", f"{ann_dir}/{test}")),
        video_dir=video_dir,
    )
DIDEMO_RETRIEVAL = VideoRetrievalConfig(
    name="default", files=_split_jsonl(""), video_dir="videos", video_exts=VIDEO_EXTS, paragraph=True
)
MSRVTT_QA = VideoQaConfig(name="default")
MSVD_QA = VideoQaConfig(
    name="default", video_dir="YouTubeClips", video_name="vid{video_id}", video_exts=(".avi", *VIDEO_EXTS),
    mapping="youtube_mapping.txt",
)
MOVING_SHAPES_RETRIEVAL = VideoRetrievalConfig(
    name="retrieval", files=_split_jsonl(RETRIEVAL_DIR, ("train", "test")), video_dir=VIDEO_DIR
)
MOVING_SHAPES_QA = VideoQaConfig(
    name="qa", files=(("train", f"{QA_DIR}/train_qa.json"), ("test", f"{QA_DIR}/test_qa.json")), video_dir=VIDEO_DIR
)

_INSTRUCTIONS = """Put the annotation files in manual_dir at the paths the builder config names, and the
videos (or folders of frame images) under manual_dir/<config.video_dir>. Nothing is downloaded."""


def load_jsonl(path: str | os.PathLike, *, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One JSON object per non-empty line; an error names the file, the line and the missing keys."""
    required = tuple(required)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}: line {n} is not JSON: {e.msg}") from None
            missing = [k for k in required if not isinstance(entry, Mapping) or k not in entry]
            if missing:
                raise AnnotationError(f"{path}: line {n} has no {missing}; every line needs {list(required)}")
            out.append(entry)
    return out


def find_video(manual: str, video_dir: str, stem: str, exts: Iterable[str]) -> str | None:
    """The path (relative to manual) of `<video_dir>/<stem><ext>` or of a frame folder `<video_dir>/<stem>`."""
    base = os.path.join(video_dir, stem)
    if os.path.isdir(os.path.join(manual, base)):
        return base
    for ext in (*exts, ""):  # "": the clip name already ends in its extension
        if os.path.isfile(os.path.join(manual, base + ext)):
            return base + ext
    return None


def video_features() -> dict[str, tfds.features.FeatureConnector]:
    """A clip by reference: its path relative to manual_dir, its id and its position among the split's videos."""
    return {
        "video": tfds.features.Text(),
        "video_id": tfds.features.Text(),
        "video_index": tfds.features.Scalar(np.int64),
    }


def _record_missing(builder, split: str, missing: list[str], skipped: int) -> None:
    set_split_metadata(builder, "num_corrupt", split, skipped)
    set_split_metadata(builder, "corrupt_files", split, missing)
    if missing:
        log.warning("%s/%s: skipped %d examples of %d missing videos", builder.name, split, skipped, len(missing))


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


def group_clip_captions(entries: Iterable[Mapping[str, Any]], paragraph: bool) -> list[tuple[str, list[str]]]:
    """(clip_name, captions) per clip in first-seen order; with `paragraph`, one caption of all sentences joined."""
    groups: dict[str, list[str]] = {}
    for e in entries:
        caption = e["caption"]
        groups.setdefault(str(e["clip_name"]), []).extend([caption] if isinstance(caption, str) else list(caption))
    if paragraph:
        return [(name, [" ".join(s.strip() for s in sentences)]) for name, sentences in groups.items()]
    return list(groups.items())


def _retrieval_info(builder) -> tfds.core.DatasetInfo:
    features = {**video_features(), "captions": tfds.features.Sequence(tfds.features.Text())}
    return base_info(builder, features, "Video-text pairs grouped per clip (the release's txt_db jsonl layout).")


def _retrieval_examples(builder, path: str, split: str, manual: str):
    cfg = builder.builder_config
    groups = group_clip_captions(load_jsonl(path, required=("clip_name", "caption")), cfg.paragraph)
    num_captions, captions, missing = [], [], []
    for name, caps in groups:
        rel = find_video(manual, cfg.video_dir, name, cfg.video_exts)
        if rel is None:
            missing.append(name)
            continue
        index = len(num_captions)
        num_captions.append(len(caps))
        captions.append(caps)
        yield index, {"video": rel, "video_id": name, "video_index": index, "captions": caps}
    set_split_metadata(builder, "num_captions", split, num_captions)
    if split != "train":
        set_split_metadata(builder, "captions", split, captions)
    _record_missing(builder, split, missing, len(missing))


class _RetrievalBuilder(ManualFilesBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return _retrieval_info(self)

    def _generate_examples(self, path, split, manual):
        return _retrieval_examples(self, path, split, manual)


class MsrvttRetrieval(_RetrievalBuilder):
    """MSRVTT text-video retrieval (ClipBERT's txt_db/msrvtt_retrieval; test.jsonl = the 1k-A split)."""

    name = "msrvtt_retrieval"
    BUILDER_CONFIGS = [MSRVTT_RETRIEVAL]


class DidemoRetrieval(_RetrievalBuilder):
    """DiDeMo paragraph-to-video retrieval ({train,val,test}.jsonl with clip_name / caption)."""

    name = "didemo_retrieval"
    BUILDER_CONFIGS = [DIDEMO_RETRIEVAL]


# ----------------------------------------------------------------------------------------------
# QA
# ----------------------------------------------------------------------------------------------


def read_mapping(path: str) -> dict[str, str]:
    """MSVD's youtube_mapping.txt: {"vid<N>": "<youtube clip>"} from lines "<youtube clip> vid<N>"."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise AnnotationError(f"{path}: line {n} should be '<clip name> <video name>', got {line.strip()!r}")
            out[parts[1]] = parts[0]
    return out


def answers_by_frequency(answers: Iterable[str]) -> list[str]:
    """Distinct answers, most frequent first, ties in first-seen order."""
    counts = collections.Counter(answers)
    order = {a: i for i, a in reversed(list(enumerate(counts)))}
    return sorted(counts, key=lambda a: (-counts[a], order[a]))


def _qa_answer_list(builder, manual: str, files: Mapping[str, str]) -> list[str]:
    for name in builder.builder_config.answer_list:
        path = os.path.join(manual, name)
        if os.path.exists(path):
            data = load_json(path)
            return [str(a) for a in (data.keys() if isinstance(data, Mapping) else data)]
    if "train" not in files:
        return []
    return answers_by_frequency(str(e["answer"]) for e in load_json(files["train"], required=("answer",)))


def _qa_info(builder) -> tfds.core.DatasetInfo:
    features = {
        **video_features(),
        "question_id": tfds.features.Scalar(np.int64),
        "question": tfds.features.Text(),
        "answers": tfds.features.Sequence(tfds.features.Text()),
        "answer_weights": tfds.features.Sequence(tfds.features.Scalar(np.float32)),
    }
    return base_info(builder, features, "Video questions with one answer each (MSRVTT-QA / MSVD-QA layout).")


def _qa_split_generators(builder, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    files = split_files(manual, builder.builder_config.files)
    builder.info.metadata["answer_list"] = _qa_answer_list(builder, manual, files)
    return {split: builder._generate_examples(path, split, manual) for split, path in files.items()}


def _qa_examples(builder, path: str, split: str, manual: str):
    cfg = builder.builder_config
    mapping = read_mapping(os.path.join(manual, cfg.mapping)) if cfg.mapping else {}
    entries = load_json(path, required=("video_id", "question", "answer"))
    videos: dict[str, int] = {}
    found: dict[str, str | None] = {}
    missing, skipped, answers, question_ids = [], 0, [], []
    kept = 0
    for i, e in enumerate(entries):
        name = cfg.video_name.format(video_id=e["video_id"])
        stem = mapping.get(name, name) if mapping else name
        if stem not in found:
            found[stem] = find_video(manual, cfg.video_dir, stem, cfg.video_exts)
            if found[stem] is None:
                missing.append(stem)
        if found[stem] is None:
            skipped += 1
            continue
        index = videos.setdefault(stem, len(videos))
        qid = int(e.get("id", i))
        answer = str(e["answer"])
        answers.append(answer)
        question_ids.append(qid)
        yield kept, {
            "video": found[stem],
            "video_id": name,
            "video_index": index,
            "question_id": qid,
            "question": e["question"],
            "answers": [answer],
            "answer_weights": np.asarray([cfg.answer_weight], np.float32),
        }
        kept += 1
    if split != "train":
        set_split_metadata(builder, "answers", split, answers)
        set_split_metadata(builder, "question_ids", split, question_ids)
    set_split_metadata(builder, "num_videos", split, len(videos))
    _record_missing(builder, split, missing, skipped)


class _QaBuilder(ManualFilesBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return _qa_info(self)

    def _split_generators(self, dl_manager):
        return _qa_split_generators(self, dl_manager)

    def _generate_examples(self, path, split, manual):
        return _qa_examples(self, path, split, manual)


class MsrvttQa(_QaBuilder):
    """MSRVTT-QA (train_qa.json / val_qa.json / test_qa.json, videos/video<id>.mp4)."""

    name = "msrvtt_qa"
    BUILDER_CONFIGS = [MSRVTT_QA]


class MsvdQa(_QaBuilder):
    """MSVD-QA (the same JSON layout; YouTubeClips/<clip>.avi named through youtube_mapping.txt)."""

    name = "msvd_qa"
    BUILDER_CONFIGS = [MSVD_QA]


# ----------------------------------------------------------------------------------------------
# The generated moving shapes (files written by `aurora_jax.data.moving_shapes.write_moving_shapes`)
# ----------------------------------------------------------------------------------------------


class MovingShapes(ManualFilesBuilder):
    """The generated moving-shapes clips through the real layouts: config "retrieval" (msrvtt jsonl) or "qa"."""

    name = "moving_shapes"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [MOVING_SHAPES_RETRIEVAL, MOVING_SHAPES_QA]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Write the files with aurora_jax.data.moving_shapes.write_moving_shapes(manual_dir)."

    def _qa(self) -> bool:
        return isinstance(self.builder_config, VideoQaConfig)

    def _info(self) -> tfds.core.DatasetInfo:
        return _qa_info(self) if self._qa() else _retrieval_info(self)

    def _split_generators(self, dl_manager):
        return _qa_split_generators(self, dl_manager) if self._qa() else super()._split_generators(dl_manager)

    def _generate_examples(self, path, split, manual):
        return (_qa_examples if self._qa() else _retrieval_examples)(self, path, split, manual)
