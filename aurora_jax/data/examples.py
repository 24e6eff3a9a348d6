"""Per-task example functions: (record, rng) -> fixed-shape numpy fields, the image excepted.

The pipeline decodes and transforms the image itself (so corrupt images are handled in one place)
and calls one of these for the text and task fields. Token ids start with [CLS] as the tokenizer
writes them; BLIP swaps in [ENC] / [DEC] inside the model, as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from aurora_jax.data.text import (
    as_text,
    conversation_turns,
    owl_segments,
    pre_caption,
    pre_question,
    special_affixes,
    tokenize,
    tokenize_segments,
)

ExampleFn = Callable[[Mapping[str, Any], np.random.Generator], dict[str, np.ndarray]]


def image_example() -> ExampleFn:
    """Images only (retrieval evaluation): {"image_index"}."""

    def fn(record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"image_index": np.int32(record["image_index"])}

    return fn


def clip_example() -> ExampleFn:
    """Clips only (video retrieval evaluation): {"image_index"} = the record's video_index."""

    def fn(record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"image_index": np.int32(record["video_index"])}

    return fn


def caption_example(
    tokenizer: Any, *, max_words: int = 30, max_length: int = 35, prompt: str = ""
) -> ExampleFn:
    """Image-text pairs (retrieval, captioning): {"text_ids", "text_mask", "image_index"}.

    Uses the record's "caption" (a `CaptionPairs` item) or a random one of its "captions". For BLIP
    captioning pass prompt="a picture of " (the loss should then skip the prompt tokens).
    """
    special_affixes(tokenizer)  # probe once here, not concurrently in the loader threads

    def fn(record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if "caption" in record:
            caption = record["caption"]
        else:
            captions = record["captions"]
            caption = captions[int(rng.integers(len(captions)))]
        ids, mask = tokenize(tokenizer, prompt + pre_caption(as_text(caption), max_words), max_length)
        return {"text_ids": ids, "text_mask": mask, "image_index": np.int32(record["image_index"])}

    return fn


def vqa_example(
    tokenizer: Any,
    *,
    train: bool,
    question_length: int = 35,
    answer_length: int = 10,
    max_answers: int = 10,
    max_question_words: int = 50,
) -> ExampleFn:
    """VQA questions (`QuestionItems`): question tokens, plus padded answer targets when training.

    Train: {"question_ids", "question_mask" (Lq,), "answer_ids", "answer_mask" (A, La),
    "answer_weights" (A,) float32 (0 for padding rows), "num_answers"}; test: question fields and
    "question_id". At most `max_answers` answers are kept (the heaviest); VQA v2 has at most 10.
    """
    special_affixes(tokenizer)  # probe once here, not concurrently in the loader threads

    def fn(record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        question = pre_question(as_text(record["question"]), max_question_words)
        q_ids, q_mask = tokenize(tokenizer, question, question_length)
        out = {"question_ids": q_ids, "question_mask": q_mask}
        if not train:
            out["question_id"] = np.int64(record["question_id"])
            return out
        answers = [as_text(a) for a in record["answers"]]
        weights = np.asarray(record["answer_weights"], np.float32)
        if not answers:
            raise ValueError(f"question {record.get('question_id')} has no answers to train on")
        keep = np.argsort(-weights, kind="stable")[:max_answers]
        keep.sort()
        a_ids = np.zeros((max_answers, answer_length), np.int32)
        a_mask = np.zeros((max_answers, answer_length), np.int32)
        a_weights = np.zeros((max_answers,), np.float32)
        ids, mask = tokenize(tokenizer, [answers[i] for i in keep], answer_length)
        a_ids[: len(keep)], a_mask[: len(keep)], a_weights[: len(keep)] = ids, mask, weights[keep]
        out.update(
            answer_ids=a_ids, answer_mask=a_mask, answer_weights=a_weights, num_answers=np.int32(len(keep))
        )
        return out

    return fn


def conversation_example(
    tokenizer: Any,
    *,
    max_length: int,
    version: int = 2,
    image_token_id: int = -200,
    num_image_tokens: int = 1,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> ExampleFn:
    """LLaVA conversations in the mPLUG-Owl v1/v2 template: {"input_ids", "attention_mask", "loss_mask",
    "has_image"}. Defaults fit Owl v2 (one -200 image token); v1 uses 65 negative ids."""

    def fn(record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        conv = record["conversations"]
        if isinstance(conv, Mapping):  # tfds returns a sequence of dicts as a dict of lists
            pairs = zip(conv["from"], conv["value"], strict=True)
            conv = [{"from": as_text(f), "value": as_text(v)} for f, v in pairs]
        has_image = bool(record.get("has_image", True))
        segments = owl_segments(conversation_turns(conv), version=version, has_image=has_image)
        out = tokenize_segments(
            tokenizer,
            segments,
            max_length,
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        out["has_image"] = np.int32(has_image)
        return out

    return fn
