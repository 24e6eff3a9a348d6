"""LLaVA-style conversations ([{"id", "image", "conversations": [{"from", "value"}, ...]}]) from manual_dir.

manual_dir holds the conversation JSON file(s) named in the config and an image folder
(config.image_dir) with the images the entries name. Entries without "image" are text-only
(has_image False, empty image bytes). Entries whose image is missing or corrupt are skipped and
counted (metadata num_corrupt / corrupt_files[split]). One example per entry:
  id, image, image_path, has_image, conversations: {from, value} (one entry per turn).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from aurora_jax.data import shapes
from aurora_jax.data.builders.common import ManualFilesBuilder, base_info, image_feature, set_split_metadata
from aurora_jax.data.records import load_json, read_image_file
from aurora_jax.data.transforms import CorruptImageError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LlavaConfig(tfds.core.BuilderConfig):
    files: tuple[tuple[str, str], ...] = (("train", "conversations.json"),)
    image_dir: str = "images"


class LlavaConversations(ManualFilesBuilder):
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

    def _generate_examples(self, path, split, manual):
        root = os.path.join(manual, self.builder_config.image_dir)
        corrupt, index = [], 0
        for i, entry in enumerate(load_json(path, required=("conversations",))):
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


# --------------------------------------------------------------------------------------------- writing


def llava_entry(ident: str, image: str, turns: Sequence[tuple[str, str]]) -> dict:
    """One LLaVA record: the image placeholder opens the first human turn."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": ident, "image": image, "conversations": conv}


def write_shapes_conversations(folder: str, *, domain: str, num_train: int, num_test: int, image_px: int,
                               seed: int = 0) -> str:
    """The generated shapes question/answer pairs as LLaVA JSON (train.json, test.json) + PNGs under folder/images.

    Train: one conversation per image with its three questions as turns in a per-image random order.
    Test: one single-turn conversation per question (the evaluation asks each on its own).
    """
    done = os.path.join(folder, "DONE")
    if os.path.exists(done):
        return folder
    for split, n in (("train", num_train), ("test", num_test)):
        if n == 0:
            continue
        os.makedirs(os.path.join(folder, "images", split), exist_ok=True)
        entries = []
        for rec in shapes.generate(n, domain=domain, split=split, image_size=image_px, seed=seed):
            rel = f"{split}/{rec['image_index']:06d}.png"
            with open(os.path.join(folder, "images", rel), "wb") as f:
                f.write(rec["image"])
            qa = list(zip(rec["questions"]["question"], rec["answers"], strict=True))
            if split == "train":
                order = np.random.default_rng([seed, rec["image_index"]]).permutation(len(qa))
                entries.append(llava_entry(f"{split}-{rec['image_index']}", rel, [qa[i] for i in order]))
            else:
                entries += [llava_entry(f"{split}-{rec['image_index']}-{k}", rel, [pair]) for k, pair in enumerate(qa)]
        with open(os.path.join(folder, f"{split}.json"), "w") as f:
            json.dump(entries, f)
    open(done, "w").close()
    return folder
