"""LLaVA-style conversations ([{"id", "image", "conversations": [{"from", "value"}, ...]}]) from manual_dir.

manual_dir holds the conversation JSON file(s) named in the config and an image folder
(config.image_dir) with the images the entries name. Entries without "image" are text-only
(has_image False, empty image bytes). Entries whose image is missing or corrupt are skipped and
counted (metadata num_corrupt / corrupt_files[split]). One example per entry:
  id, image, image_path, has_image, conversations: {from, value} (one entry per turn).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from aurora_jax.data.builders.common import (
    LocalBuilder,
    base_info,
    image_feature,
    set_split_metadata,
    split_files,
)
from aurora_jax.data.records import load_json, read_image_file
from aurora_jax.data.transforms import CorruptImageError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LlavaConfig(tfds.core.BuilderConfig):
    files: tuple[tuple[str, str], ...] = (("train", "conversations.json"),)
    image_dir: str = "images"


class LlavaConversations(LocalBuilder):
    """Instruction-tuning conversations with an optional image each."""

    name = "llava_conversations"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [LlavaConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """Put the conversation JSON (default name conversations.json) in
manual_dir and the images in manual_dir/images (or as configured). Nothing is downloaded."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "id": tfds.features.Text(),
            "image": image_feature(),
            "image_path": tfds.features.Text(),
            "has_image": tfds.features.Scalar(np.bool_),
            "conversations": tfds.features.Sequence(
                {"from": tfds.features.Text(), "value": tfds.features.Text()}
            ),
        }
        return base_info(self, features, "LLaVA-style conversations.")

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        root = os.path.join(manual, self.builder_config.image_dir)
        files = split_files(manual, self.builder_config.files)
        return {split: self._generate_examples(path, split, root) for split, path in files.items()}

    def _generate_examples(self, path, split, root):
        corrupt, index = [], 0
        for i, entry in enumerate(load_json(path)):
            image_path = entry.get("image", "")
            data = b""
            if image_path:
                try:
                    data = read_image_file(os.path.join(root, image_path))
                except CorruptImageError as e:
                    log.warning("skipping conversation %s: %s", entry.get("id", i), e)
                    corrupt.append(image_path)
                    continue
            turns = [{"from": t["from"], "value": t["value"]} for t in entry["conversations"]]
            yield (
                index,
                {
                    "id": str(entry.get("id", i)),
                    "image": data,
                    "image_path": image_path,
                    "has_image": bool(image_path),
                    "conversations": turns,
                },
            )
            index += 1
        set_split_metadata(self, "num_corrupt", split, len(corrupt))
        set_split_metadata(self, "corrupt_files", split, corrupt)
