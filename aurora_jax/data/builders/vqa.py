"""VQA v2 (plus optional Visual Genome QA) in BLIP's annotation format, read from manual_dir.

manual_dir holds vqa_train.json / vqa_val.json / vqa_test.json / vg_qa.json (any subset) and
answer_list.json, with images at the paths the annotations name (relative to manual_dir, or to
manual_dir/<image_dirs[dataset]>). One example per image:
  image, image_path, image_index,
  questions: {question_id, question, dataset, num_answers} (one entry per question),
  answers, answer_weights: the distinct answers of all questions, question after question, with
  BLIP's weights (VQA: count / number of answers; VG: 0.2).
Use `records.QuestionItems` to iterate per question. Metadata: num_questions[split], answer_list,
num_corrupt / corrupt_files[split].
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from aurora_jax.data.builders.common import (
    LocalBuilder,
    base_info,
    image_feature,
    set_split_metadata,
    split_files,
    with_images,
)
from aurora_jax.data.records import group_questions, load_json


@dataclasses.dataclass
class VqaConfig(tfds.core.BuilderConfig):
    files: tuple[tuple[str, str], ...] = (
        ("train", "vqa_train.json"),
        ("val", "vqa_val.json"),
        ("test", "vqa_test.json"),
        ("vg", "vg_qa.json"),
    )
    answer_list: str = "answer_list.json"
    image_dirs: tuple[tuple[str, str], ...] = ()  # (dataset, subfolder of manual_dir); default ""


class VqaV2(LocalBuilder):
    """BLIP's VQA v2 annotation files, stored grouped per image."""

    name = "vqa_v2"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [VqaConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """Put BLIP's vqa_*.json (and optionally vg_qa.json) and
answer_list.json in manual_dir, images at the relative paths the annotations use. Nothing is downloaded."""

    def _info(self) -> tfds.core.DatasetInfo:
        question = {
            "question_id": tfds.features.Scalar(np.int64),
            "question": tfds.features.Text(),
            "dataset": tfds.features.Text(),
            "num_answers": tfds.features.Scalar(np.int32),
        }
        features = {
            "image": image_feature(),
            "image_path": tfds.features.Text(),
            "image_index": tfds.features.Scalar(np.int64),
            "questions": tfds.features.Sequence(question),
            "answers": tfds.features.Sequence(tfds.features.Text()),
            "answer_weights": tfds.features.Sequence(tfds.features.Scalar(np.float32)),
        }
        return base_info(self, features, "VQA questions grouped per image with BLIP's answer weights.")

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        cfg = self.builder_config
        answer_list = os.path.join(manual, cfg.answer_list)
        if os.path.exists(answer_list):
            self.info.metadata["answer_list"] = list(load_json(answer_list))
        dirs = dict(cfg.image_dirs)
        files = split_files(manual, cfg.files)
        return {split: self._generate_examples(path, split, manual, dirs) for split, path in files.items()}

    def _generate_examples(self, path, split, manual, dirs):
        def root_of(group):
            return os.path.join(manual, dirs.get(group["questions"]["dataset"][0], ""))

        num_questions = []
        for index, group, data in with_images(self, group_questions(load_json(path)), split, root_of):
            num_questions.append(len(group["questions"]["question"]))
            yield (
                index,
                {
                    "image": data,
                    "image_path": group["image"],
                    "image_index": index,
                    "questions": group["questions"],
                    "answers": group["answers"],
                    "answer_weights": np.asarray(group["answer_weights"], np.float32),
                },
            )
        set_split_metadata(self, "num_questions", split, num_questions)
