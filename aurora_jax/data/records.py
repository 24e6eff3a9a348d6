"""Annotation parsing and random-access views over stored records (pure Python, no tfds, no grain).

Storage is one record per image (captions and questions grouped under it), so a COCO or VG image
is stored once however many captions or questions it has. The views below expand a per-image
source into BLIP's per-caption or per-question items without reading anything up front, given
the per-image counts the builders save in their metadata.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aurora_jax.data.text import as_text, vqa_answer_weights
from aurora_jax.data.transforms import CorruptImageError, decode_image

log = logging.getLogger(__name__)

VG_ANSWER_WEIGHT = 0.2  # BLIP's fixed weight for the single Visual Genome answer


class AnnotationError(ValueError):
    """An annotation file that cannot be used as it is; the message names the file and the entry."""


def load_json(path: str | os.PathLike, *, required: Sequence[str] = ()) -> Any:
    """A JSON file; with `required`, a list of entries each of which must have those keys."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if required:
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected a list of entries, found {type(data).__name__}")
        for i, entry in enumerate(data):
            missing = [k for k in required if not isinstance(entry, Mapping) or k not in entry]
            if missing:
                ident = entry.get("id", entry.get("image", "")) if isinstance(entry, Mapping) else ""
                raise AnnotationError(f"{path}: entry {i}{f' ({ident})' if ident else ''} has no {missing}; "
                                      f"every entry needs {list(required)}")
    return data


def read_image_file(path: str | os.PathLike) -> bytes:
    """The file's bytes after checking they decode; CorruptImageError if missing, unreadable or corrupt."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptImageError(f"cannot read {path}: {e}") from e
    decode_image(data)
    return data


# ----------------------------------------------------------------------------------------------
# Grouping annotation entries per image
# ----------------------------------------------------------------------------------------------


def group_captions(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """BLIP caption entries -> one {"image", "image_id", "captions"} per image, in first-seen order.

    Accepts both BLIP layouts: train entries ({"image", "caption": str, "image_id"}, one per caption)
    and val/test entries ({"image", "caption": [str, ...]}).
    """
    groups: dict[str, dict[str, Any]] = {}
    for e in entries:
        key = str(e.get("image_id", e["image"]))
        g = groups.setdefault(key, {"image": e["image"], "image_id": key, "captions": []})
        caps = e["caption"]
        g["captions"].extend([caps] if isinstance(caps, str) else list(caps))
    return list(groups.values())


def vqa_targets(entry: Mapping[str, Any]) -> tuple[list[str], list[float]]:
    """BLIP's answer targets for one question: VQA answers weighted by frequency, VG answers by 0.2."""
    if "answer" not in entry:  # test questions have no answers
        return [], []
    answer = entry["answer"]
    if entry.get("dataset", "vqa") == "vg":
        answers = [answer] if isinstance(answer, str) else list(answer)
        return answers, [VG_ANSWER_WEIGHT] * len(answers)
    return vqa_answer_weights([answer] if isinstance(answer, str) else list(answer))


def group_questions(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """BLIP VQA entries -> one record per image with its questions and flattened answer targets.

    Record: {"image", "questions": {"question_id", "question", "dataset", "num_answers"} (lists),
    "answers", "answer_weights"} where the answers of question k are the `num_answers[k]` entries
    after those of questions < k.
    """
    groups: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(entries):
        g = groups.get(e["image"])
        if g is None:
            qs = {"question_id": [], "question": [], "dataset": [], "num_answers": []}
            g = groups[e["image"]] = {
                "image": e["image"],
                "questions": qs,
                "answers": [],
                "answer_weights": [],
            }
        answers, weights = vqa_targets(e)
        q = g["questions"]
        q["question_id"].append(int(e.get("question_id", i)))
        q["question"].append(e["question"])
        q["dataset"].append(e.get("dataset", "vqa"))
        q["num_answers"].append(len(answers))
        g["answers"].extend(answers)
        g["answer_weights"].extend(weights)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------
# Views: per-caption and per-question items over per-image records
# ----------------------------------------------------------------------------------------------


def _counts(source: Sequence[Mapping[str, Any]], counts: Sequence[int] | None, fn) -> np.ndarray:
    if counts is None:  # no metadata: read every record once (fine for small or in-memory sources)
        counts = [fn(source[i]) for i in range(len(source))]
    counts = np.asarray(counts, np.int64)
    if len(counts) != len(source):
        raise ValueError(f"{len(counts)} counts for a source of {len(source)} records")
    return counts


class _ExpandedView(Sequence):
    """Item i of the flattened (record, k) pairs, located by a binary search over cumulative counts."""

    def __init__(self, source: Sequence[Mapping[str, Any]], counts: np.ndarray):
        self.source = source
        self._ends = np.cumsum(counts).tolist()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        pos = bisect.bisect_right(self._ends, index)
        start = self._ends[pos - 1] if pos else 0
        return pos, index - start

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._item(*self._locate(int(index)))


class CaptionPairs(_ExpandedView):
    """(image, caption) items in BLIP's training order: one per caption of every image.

    Item: {"image", "image_index", "image_id", "caption", "caption_index"}.
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], num_captions: Sequence[int] | None = None):
        super().__init__(source, _counts(source, num_captions, lambda r: len(r["captions"])))

    def _item(self, pos: int, k: int) -> dict[str, Any]:
        rec = self.source[pos]
        return {
            "image": rec["image"],
            "image_index": int(rec.get("image_index", pos)),
            "image_id": as_text(rec.get("image_id", str(pos))),
            "caption": as_text(rec["captions"][k]),
            "caption_index": k,
        }


class QuestionItems(_ExpandedView):
    """One item per question: {"image", "image_index", "question_id", "question", "answers",
    "answer_weights", "dataset"} (answers empty for test questions)."""

    def __init__(self, source: Sequence[Mapping[str, Any]], num_questions: Sequence[int] | None = None):
        super().__init__(source, _counts(source, num_questions, lambda r: len(r["questions"]["question"])))

    def _item(self, pos: int, k: int) -> dict[str, Any]:
        rec = self.source[pos]
        qs = rec["questions"]
        num_answers = [int(n) for n in qs["num_answers"]]
        start = sum(num_answers[:k])
        stop = start + num_answers[k]
        return {
            "image": rec["image"],
            "image_index": int(rec.get("image_index", pos)),
            "question_id": int(qs["question_id"][k]),
            "question": as_text(qs["question"][k]),
            "dataset": as_text(qs["dataset"][k]),
            "answers": [as_text(a) for a in rec["answers"][start:stop]],
            "answer_weights": [float(w) for w in rec["answer_weights"][start:stop]],
        }


def flatten_captions(
    captions_per_image: Sequence[Sequence[str | bytes]],
) -> tuple[list[str], np.ndarray, list[list[int]]]:
    """Texts of a retrieval test split with their mappings: (texts, txt2img (T,) int32, img2txt).

    Text t describes image `txt2img[t]`; image i is described by texts `img2txt[i]` (R@K ground truth).
    """
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    for i, caps in enumerate(captions_per_image):
        img2txt.append(list(range(len(texts), len(texts) + len(caps))))
        texts.extend(as_text(c) for c in caps)
        txt2img.extend([i] * len(caps))
    return texts, np.asarray(txt2img, np.int32), img2txt


def captions_of(source: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Every record's caption list (reads the whole source: use the builder metadata when it has them)."""
    return [[as_text(c) for c in source[i]["captions"]] for i in range(len(source))]
