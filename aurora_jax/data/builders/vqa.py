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
    ManualFilesBuilder,
    base_info,
    image_features,
    question_features,
    set_split_metadata,
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


class VqaV2(ManualFilesBuilder):
    """BLIP's VQA v2 annotation files, stored grouped per image."""

    name = "vqa_v2"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [VqaConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """Put BLIP's vqa_*.json (and optionally vg_qa.json) and
answer_list.json in manual_dir, images at the relative paths the annotations use. Nothing is downloaded."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = {**image_features(), **question_features()}
        return base_info(self, features, "VQA questions grouped per image with BLIP's answer weights.")

    def _split_generators(self, dl_manager):
        answer_list = os.path.join(os.fspath(dl_manager.manual_dir), self.builder_config.answer_list)
        if os.path.exists(answer_list):
            self.info.metadata["answer_list"] = list(load_json(answer_list))
        return super()._split_generators(dl_manager)

    def _generate_examples(self, path, split, manual):
        dirs = dict(self.builder_config.image_dirs)

        def root_of(group):
            return os.path.join(manual, dirs.get(group["questions"]["dataset"][0], ""))

        num_questions = []
        groups = group_questions(load_json(path, required=("image", "question")))
        for index, group, data in with_images(self, groups, split, root_of):
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
