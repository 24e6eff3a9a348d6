"""Assemble a task's data from the tfds builders and grain pipelines: train iterator + evaluation inputs."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections as mlc
import numpy as np


@dataclasses.dataclass
class TaskData:
    train: Any  # grain IterDataset of global-batch-sized (per host) dicts; iter() is checkpointable
    steps_per_epoch: int
    eval_images: Any = None  # grain dataset of {"image", "image_index"} (retrieval) or questions (VQA)
    eval_text_ids: np.ndarray | None = None  # retrieval: every test caption, tokenised
    eval_text_mask: np.ndarray | None = None
    txt2img: np.ndarray | None = None
    img2txt: list[list[int]] | None = None
    answer_list: list[str] | None = None  # VQA: candidate answers and their tokens
    answer_ids: np.ndarray | None = None
    answer_mask: np.ndarray | None = None
    gt_answers: dict[int, list[str]] | None = None  # VQA: question_id -> the annotators' answers
    num_corrupt: int = 0
    tokenizer: Any = None


EVAL_SPLITS = {"shapes": "test", "coco_karpathy": "test", "flickr30k_karpathy": "test", "vqa_v2": "val"}


def _builder(config: mlc.ConfigDict, workdir: str):
    from aurora_jax.data import builders

    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    name = config.data.name
    if name == "shapes":
        cfg = builders.shapes_config(config.data.domain, num_train=config.data.num_train,
                                     num_test=config.data.num_test, image_size=config.data.get("image_px", 64),
                                     seed=config.data.get("seed", 0))
        return builders.build(builders.Shapes, data_dir, config=cfg)
    cls = {"coco_karpathy": builders.CocoKarpathy, "flickr30k_karpathy": builders.Flickr30kKarpathy,
           "vqa_v2": builders.VqaV2}[name]
    return builders.build(cls, data_dir, manual_dir=config.data.manual_dir)


def build_task_data(config: mlc.ConfigDict, tokenizer: Any, workdir: str) -> TaskData:
    """Train pipeline and evaluation inputs for config.task on config.data.name."""
    from aurora_jax.data import builders, examples, pipeline
    from aurora_jax.data.records import CaptionPairs, QuestionItems, flatten_captions
    from aurora_jax.data.text import tokenize

    builder = _builder(config, workdir)
    train_split = builders.open_split(builder, "train")
    eval_split = builders.open_split(builder, EVAL_SPLITS[config.data.name])
    size = config.model.image_size
    per_host = config.optim.batch_size // jax.process_count()
    common = dict(image_size=size, seed=config.seed)
    if not config.data.augment:
        from aurora_jax.data.pipeline import default_image_fn

        common["image_fn"] = default_image_fn(size, False)
    out: dict[str, Any] = {"num_corrupt": train_split.num_corrupt + eval_split.num_corrupt}

    if config.task in ("retrieval", "caption"):
        pairs = CaptionPairs(train_split.source, train_split.per_split("num_captions"))
        prompt = config.data.get("prompt", "") if config.task == "caption" else ""
        fn = examples.caption_example(tokenizer, max_words=config.data.max_words, max_length=config.data.max_len,
                                      prompt=prompt)
        train = pipeline.make_dataset(pairs, fn, batch_size=per_host, train=True, **common)
        n_train = len(pairs)
        captions = eval_split.per_split("captions")
        if captions is None:
            from aurora_jax.data.records import captions_of

            captions = captions_of(eval_split.source)
        texts, txt2img, img2txt = flatten_captions(captions)
        from aurora_jax.data.text import pre_caption

        ids, mask = tokenize(tokenizer, [prompt + pre_caption(t, config.data.max_words) for t in texts],
                             config.data.max_len)
        images = pipeline.make_dataset(eval_split.source, examples.image_example(),
                                       batch_size=config.eval.batch_size, train=False, image_size=size,
                                       image_fn=pipeline.default_image_fn(size, False))
        out.update(eval_images=images, eval_text_ids=ids, eval_text_mask=mask, txt2img=txt2img,
                   img2txt=img2txt)
    else:
        qs = QuestionItems(train_split.source, train_split.per_split("num_questions"))
        fn = examples.vqa_example(tokenizer, train=True, max_answers=config.data.max_answers,
                                  answer_length=config.data.get("answer_len", 10))
        train = pipeline.make_dataset(qs, fn, batch_size=per_host, train=True, **common)
        n_train = len(qs)
        eval_qs = QuestionItems(eval_split.source, eval_split.per_split("num_questions"))
        eval_fn = examples.vqa_example(tokenizer, train=False)
        images = pipeline.make_dataset(eval_qs, eval_fn, batch_size=config.eval.batch_size, train=False,
                                       image_size=size, image_fn=pipeline.default_image_fn(size, False))
        gt = {}
        for i in range(len(eval_qs)):  # answers only (no image decode): cheap on the metadata
            item = eval_qs[i]
            gt[item["question_id"]] = item["answers"]
        answer_list = (builder.info.metadata or {}).get("answer_list") or sorted(
            {a for answers in gt.values() for a in answers})
        a_ids, a_mask = tokenize(tokenizer, list(answer_list), config.data.get("answer_len", 10))
        a_ids[:, 0] = tokenizer.bos_token_id
        out.update(eval_images=images, answer_list=list(answer_list), answer_ids=a_ids, answer_mask=a_mask,
                   gt_answers=gt)
    steps = pipeline.steps_per_epoch(n_train, config.optim.batch_size, train=True)
    return TaskData(train=train, steps_per_epoch=steps, tokenizer=tokenizer, **out)
