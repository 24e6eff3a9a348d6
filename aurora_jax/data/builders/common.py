"""Shared pieces of the tfds builders: features, image reading with corrupt-image accounting, build/open.

Everything runs without TensorFlow: images are handed to `tfds.features.Image` as already-encoded
bytes (tfds only needs TF to *encode* numpy arrays), files are written as array_record, and reading
goes through `as_data_source()` with image decoding skipped (our pipeline decodes, so a corrupt
image is counted there instead of crashing a worker).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from aurora_jax.data.records import read_image_file
from aurora_jax.data.transforms import CorruptImageError

log = logging.getLogger(__name__)

FILE_FORMAT = "array_record"


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders: inputs are local files or generated, output array_record, splits keep order."""

    # tfds locates a packaged builder's source through the `importlib_resources` backport, which it only
    # declares as a dependency for Python < 3.9; answering from the class's file avoids needing it.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


class ManualFilesBuilder(LocalBuilder, skip_registration=True):
    """A builder over annotation files in manual_dir: one split per `builder_config.files` entry found.

    Subclasses write `_generate_examples(path, split, manual_dir)`.
    """

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        files = split_files(manual, self.builder_config.files)
        return {split: self._generate_examples(path, split, manual) for split, path in files.items()}


def image_feature() -> tfds.features.Image:
    # Encoded JPEG/PNG bytes are stored as given; the shape only documents the decoded layout.
    return tfds.features.Image(shape=(None, None, 3))


def image_features() -> dict[str, tfds.features.FeatureConnector]:
    """One image per example: its bytes, its path and its position in the split."""
    return {
        "image": image_feature(),
        "image_path": tfds.features.Text(),
        "image_index": tfds.features.Scalar(np.int64),
    }


def caption_features() -> dict[str, tfds.features.FeatureConnector]:
    return {"image_id": tfds.features.Text(), "captions": tfds.features.Sequence(tfds.features.Text())}


def question_features() -> dict[str, tfds.features.FeatureConnector]:
    """The image's questions and the distinct answers of all of them, question after question, weighted."""
    question = {
        "question_id": tfds.features.Scalar(np.int64),
        "question": tfds.features.Text(),
        "dataset": tfds.features.Text(),
        "num_answers": tfds.features.Scalar(np.int32),
    }
    return {
        "questions": tfds.features.Sequence(question),
        "answers": tfds.features.Sequence(tfds.features.Text()),
        "answer_weights": tfds.features.Sequence(tfds.features.Scalar(np.float32)),
    }


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo that never looks for published metadata on GCS: our datasets only exist locally."""

    def initialize_from_bucket(self) -> None:
        # The stock method makes a temporary directory on every builder construction before it
        # finds out that GCS access is disabled; there is nothing to fetch for these datasets.
        return None


def base_info(builder: tfds.core.DatasetBuilder, features: Mapping[str, Any], description: str):
    """DatasetInfo built directly (no metadata files next to the code) that keeps generation order.

    Order matters: a test split's record position is its image index for retrieval metrics.
    """
    return _LocalDatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(dict(features)),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )


def set_split_metadata(builder: tfds.core.DatasetBuilder, key: str, split: str, value: Any) -> None:
    """metadata[key][split] = value (saved as metadata.json next to the records)."""
    table = dict(builder.info.metadata.get(key, {}))
    table[split] = value
    builder.info.metadata[key] = table


def with_images(
    builder: tfds.core.DatasetBuilder, groups: Sequence[Mapping[str, Any]], split: str, root_of
) -> Iterator[tuple[int, dict[str, Any], bytes]]:
    """(image_index, group, image bytes) for every group whose image reads and decodes.

    Missing, unreadable and corrupt images are skipped and counted in metadata["num_corrupt"][split]
    (their paths in metadata["corrupt_files"][split]); indices count kept images only.
    """
    corrupt: list[str] = []
    kept = 0
    for group in groups:
        path = os.path.join(root_of(group), group["image"])
        try:
            data = read_image_file(path)
        except CorruptImageError as e:
            log.warning("skipping image %s: %s", path, e)
            corrupt.append(group["image"])
            continue
        yield kept, group, data
        kept += 1
    set_split_metadata(builder, "num_corrupt", split, len(corrupt))
    set_split_metadata(builder, "corrupt_files", split, corrupt)
    if corrupt:
        log.warning("%s/%s: skipped %d corrupt or missing images", builder.name, split, len(corrupt))


def split_files(manual_dir: os.PathLike, files: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{split: annotation path} for the annotation files present in manual_dir (at least one)."""
    found = {
        split: os.path.join(manual_dir, name)
        for split, name in files
        if os.path.exists(os.path.join(manual_dir, name))
    }
    if not found:
        names = ", ".join(name for _, name in files)
        raise FileNotFoundError(f"no annotation file found in {manual_dir} (expected one of: {names})")
    return found


def build(
    builder_cls: type[tfds.core.DatasetBuilder],
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    config: tfds.core.BuilderConfig | str | None = None,
) -> tfds.core.DatasetBuilder:
    """Generate (once) the dataset as array_record files under data_dir; never downloads."""
    builder = builder_cls(data_dir=os.fspath(data_dir), config=config, file_format=FILE_FORMAT)
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir is not None else None
    )
    builder.download_and_prepare(download_config=download_config)
    return builder


@dataclasses.dataclass
class SplitData:
    """A prepared split: random-access records (images as encoded bytes) and the dataset metadata."""

    source: Sequence[Mapping[str, Any]]
    metadata: Mapping[str, Any]
    split: str

    def per_split(self, key: str) -> Any:
        """metadata[key][split], or None when the builder did not record it."""
        return self.metadata.get(key, {}).get(self.split)

    @property
    def num_corrupt(self) -> int:
        return int(self.per_split("num_corrupt") or 0)


def open_split(builder_or_dir: tfds.core.DatasetBuilder | str | os.PathLike, split: str) -> SplitData:
    """Open a prepared split from a builder or its dataset directory (.../<name>/<config>/<version>)."""
    if isinstance(builder_or_dir, tfds.core.DatasetBuilder):
        builder = builder_or_dir
    else:
        builder = tfds.builder_from_directory(os.fspath(builder_or_dir))
    # Video records hold paths, not pixels: nothing to skip there.
    decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
    source = builder.as_data_source(split=split, decoders=decoders)
    return SplitData(source=source, metadata=dict(builder.info.metadata or {}), split=split)
