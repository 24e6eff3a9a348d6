"""COCO and Flickr30K Karpathy splits in BLIP's annotation format, read from the user's manual_dir.

manual_dir holds BLIP's annotation files (e.g. coco_karpathy_train.json, coco_karpathy_val.json,
coco_karpathy_test.json) and the images at the paths those files name (relative to
manual_dir/image_dir). One example per image:
  image (encoded bytes), image_path, image_id, image_index (position in the split), captions.
Metadata: num_captions[split] (per image, for `CaptionPairs`), captions[split] for val/test (texts
for retrieval evaluation without reading images), num_corrupt / corrupt_files[split].
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from aurora_jax.data.builders.common import (
    ManualFilesBuilder,
    base_info,
    caption_features,
    image_features,
    set_split_metadata,
    with_images,
)
from aurora_jax.data.records import group_captions, load_json


@dataclasses.dataclass
class KarpathyConfig(tfds.core.BuilderConfig):
    files: tuple[tuple[str, str], ...] = ()  # (split, annotation file name in manual_dir)
    image_dir: str = ""  # image paths in the annotations are relative to manual_dir/image_dir


_INSTRUCTIONS = """Put BLIP's annotation JSON files in manual_dir, and the images under manual_dir
(or manual_dir/<config.image_dir>) at the relative paths the annotations use. Nothing is downloaded."""


def karpathy_config(prefix: str) -> KarpathyConfig:
    """BLIP's {prefix}_{train,val,test}.json annotation files."""
    return KarpathyConfig(name="default", files=tuple((s, f"{prefix}_{s}.json") for s in ("train", "val", "test")))


class _KarpathyBuilder(ManualFilesBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        features = {**image_features(), **caption_features()}
        return base_info(self, features, "Image-text pairs grouped per image (BLIP Karpathy splits).")

    def _generate_examples(self, path, split, manual):
        root = os.path.join(manual, self.builder_config.image_dir)
        num_captions, captions = [], []
        groups = group_captions(load_json(path, required=("image", "caption")))
        for index, group, data in with_images(self, groups, split, lambda g: root):
            num_captions.append(len(group["captions"]))
            captions.append(group["captions"])
            yield (
                index,
                {
                    "image": data,
                    "image_path": group["image"],
                    "image_id": group["image_id"],
                    "image_index": index,
                    "captions": group["captions"],
                },
            )
        set_split_metadata(self, "num_captions", split, num_captions)
        if split != "train":  # evaluation texts; the train captions would make the metadata file large
            set_split_metadata(self, "captions", split, captions)


class CocoKarpathy(_KarpathyBuilder):
    """COCO Karpathy splits (BLIP's coco_karpathy_{train,val,test}.json)."""

    name = "coco_karpathy"
    BUILDER_CONFIGS = [karpathy_config("coco_karpathy")]


class Flickr30kKarpathy(_KarpathyBuilder):
    """Flickr30K Karpathy splits (BLIP's flickr30k_{train,val,test}.json)."""

    name = "flickr30k_karpathy"
    BUILDER_CONFIGS = [karpathy_config("flickr30k")]
