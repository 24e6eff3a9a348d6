"""The generated `shapes` dataset (`aurora_jax.data.shapes`) as a tfds builder; nothing is read or downloaded.

One example per image: image (PNG bytes), image_path, image_id, image_index, captions, questions
{question_id, question, dataset, num_answers}, answers, answer_weights, objects {shape, color, row,
col}. It serves retrieval/captioning (`CaptionPairs`) and VQA (`QuestionItems`) alike.
Metadata: num_captions[split], num_questions[split], captions[test].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from aurora_jax.data import shapes
from aurora_jax.data.builders.common import (
    LocalBuilder,
    base_info,
    caption_features,
    image_features,
    question_features,
    set_split_metadata,
)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    domain: str = "pretrain"
    num_train: int = 2000
    num_test: int = 200
    image_size: int = 64
    seed: int = 0


def shapes_config(
    domain: str = "pretrain", num_train: int = 2000, num_test: int = 200, image_size: int = 64, seed: int = 0
) -> ShapesConfig:
    """A config whose name encodes every parameter, so differently sized datasets get separate folders."""
    name = f"{domain}_n{num_train}_t{num_test}_px{image_size}_s{seed}"
    return ShapesConfig(
        name=name, domain=domain, num_train=num_train, num_test=num_test, image_size=image_size, seed=seed
    )


class Shapes(LocalBuilder):
    """Rendered pictures of 1-3 coloured shapes with captions and question/answer pairs."""

    name = "shapes"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [shapes_config("pretrain"), shapes_config("downstream")]

    def _info(self) -> tfds.core.DatasetInfo:
        obj = {
            "shape": tfds.features.Text(),
            "color": tfds.features.Text(),
            "row": tfds.features.Scalar(np.int32),
            "col": tfds.features.Scalar(np.int32),
        }
        features = {
            **image_features(),
            **caption_features(),
            **question_features(),
            "objects": tfds.features.Sequence(obj),
        }
        return base_info(self, features, "Generated shapes with captions and questions.")

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split, num_images):
        cfg = self.builder_config
        num_captions, num_questions, captions = [], [], []
        for rec in shapes.generate(
            num_images, domain=cfg.domain, split=split, image_size=cfg.image_size, seed=cfg.seed
        ):
            num_captions.append(len(rec["captions"]))
            num_questions.append(len(rec["questions"]["question"]))
            captions.append(rec["captions"])
            yield rec["image_index"], {**rec, "answer_weights": np.asarray(rec["answer_weights"], np.float32)}
        set_split_metadata(self, "num_captions", split, num_captions)
        set_split_metadata(self, "num_questions", split, num_questions)
        set_split_metadata(self, "num_corrupt", split, 0)
        if split != "train":
            set_split_metadata(self, "captions", split, captions)
