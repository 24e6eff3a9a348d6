"""grain input pipelines over any random-access source (a tfds `as_data_source()` split, a records view,
a list): per-host sharding, seeded shuffling, BLIP image transforms, tokenisation, batching, and a
checkpointable iterator.

Randomness is a pure function of (seed, epoch, source index), so a batch does not depend on
threading, on where an iterator was restored, or on how many hosts share the data.

Training: each host takes an equal slice (the last `n % hosts` examples are dropped so that every
host runs the same number of steps), reshuffled every epoch; corrupt images are dropped and
counted; the last partial batch is dropped.
Evaluation: no shuffling; every host yields the same number of full batches, padded with rows whose
"valid" is 0 (corrupt images also get valid 0), so jitted code sees static shapes and multi-host
collectives stay in step.

Batches are dicts of numpy arrays: "image" (B, H, W, 3) float32, "valid" (B,) int32, plus the
fields of the example function (`make_clip_dataset`: "video" (B, T, S, S, 3) instead of "image", corrupt or
too-short clips handled like corrupt images). The number of corrupt examples met so far is part of the iterator
state (`num_skipped(iterator)`), so it survives checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from aurora_jax.data.examples import ExampleFn
from aurora_jax.data.text import as_text
from aurora_jax.data.transforms import CorruptImageError, decode_image, normalize, test_transform, train_transform
from aurora_jax.data.video import DIDEMO_TARGET_FPS, VideoError

ImageFn = Callable[[Image.Image, np.random.Generator], np.ndarray]
_CORRUPT = "_corrupt"  # internal element key, consumed by the counting iterator
SKIPPED_STATE_KEY = "num_skipped"
log = logging.getLogger(__name__)


def host_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """(index, count) of this host, defaulting to JAX's process index and count."""
    if shard_index is None or shard_count is None:
        import jax  # local import: the pipeline itself does not need JAX

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard index {shard_index} out of range for {shard_count} shards")
    return shard_index, shard_count


def train_shard_size(num_examples: int, shard_count: int) -> int:
    """Examples per host in training: an equal share, the remainder dropped."""
    return num_examples // shard_count


def eval_shard_size(num_examples: int, shard_count: int, batch_size: int) -> int:
    """Rows per host in evaluation: the largest host share rounded up to whole batches (same on all hosts)."""
    return math.ceil(math.ceil(num_examples / shard_count) / batch_size) * batch_size


def steps_per_epoch(num_examples: int, batch_size: int, *, train: bool, shard_count: int = 1) -> int:
    """Batches one host yields per epoch (training batches run on across epoch boundaries, so with several
    epochs the total is floor(epochs * examples / batch), not epochs * this)."""
    if train:
        return train_shard_size(num_examples, shard_count) // batch_size
    return eval_shard_size(num_examples, shard_count, batch_size) // batch_size


def default_image_fn(image_size: int, train: bool) -> ImageFn:
    """BLIP's train (random crop, flip, RandAugment) or test (resize) transform at `image_size`."""
    if train:
        return lambda img, rng: train_transform(img, image_size, rng)
    return lambda img, rng: test_transform(img, image_size)


def _index_plan(
    num_examples: int,
    *,
    train: bool,
    seed: int,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
    batch_size: int,
) -> grain.MapDataset:
    """A MapDataset of (source index, valid, epoch) in the order this host reads them.

    Training: one global stream (a per-epoch reshuffle of every example, epochs run into each other) cut into
    global batches of `batch_size * shard_count`; host h reads rows [h * batch_size, (h + 1) * batch_size) of each.
    The global batches are therefore the same whatever the number of hosts.
    """
    if train:
        if num_examples < shard_count:
            raise ValueError(f"{num_examples} examples cannot feed {shard_count} hosts")
        stream = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(num_epochs)
        global_batch = batch_size * shard_count
        # A finite stream ends in a partial global batch: every host takes an equal share of it (the remainder
        # is dropped), so that all hosts run the same number of steps.
        full, rest = divmod(len(stream), global_batch)
        tail = rest // shard_count

        def locate_train(q: int) -> tuple[int, bool, int]:
            if q < full * batch_size:
                g = q // batch_size * global_batch + shard_index * batch_size + q % batch_size
            else:
                g = full * global_batch + shard_index * tail + (q - full * batch_size)
            return int(stream[g]), True, g // num_examples

        return grain.MapDataset.range(full * batch_size + tail).map(locate_train)
    rows = eval_shard_size(num_examples, shard_count, batch_size)
    mine = len(range(shard_index, num_examples, shard_count))

    def locate(pos: int) -> tuple[int, bool, int]:
        if pos < mine:
            return shard_index + pos * shard_count, True, 0
        return (shard_index if shard_index < num_examples else 0), False, 0  # padding row

    return grain.MapDataset.range(rows).map(locate)


MediaFn = Callable[[Mapping[str, Any], np.random.Generator], np.ndarray | None]


def _loader(
    source: Sequence[Mapping[str, Any]],
    example_fn: ExampleFn,
    media_fn: MediaFn,
    *,
    key: str,
    blank_shape: tuple[int, ...],
    errors: type[Exception] | tuple[type[Exception], ...],
    train: bool,
    seed: int,
) -> Callable[[tuple[int, bool, int]], dict[str, Any]]:
    """The map from a planned (source index, valid, epoch) to an example dict with the record's media at `key`.

    `media_fn(record, rng)` decodes it (None: the record has none, a blank stands in). A record whose media
    raises one of `errors` is dropped in training and kept blank with valid 0 in evaluation, counted either way.
    """

    def load(planned: tuple[int, bool, int]) -> dict[str, Any]:
        index, valid, epoch = planned
        rng = np.random.default_rng([seed, epoch, index])
        record = source[index]
        corrupt = False
        try:
            media = media_fn(record, rng)
        except errors as e:
            log.warning("skipping %s of example %d: %s", key, index, e)
            if train:
                return {_CORRUPT: True}
            corrupt, media = True, None
        out = dict(example_fn(record, rng))
        out[key] = np.zeros(blank_shape, np.float32) if media is None else np.asarray(media, np.float32)
        out["valid"] = np.int32(valid and not corrupt)
        out[_CORRUPT] = corrupt
        return out

    return load


def _batched(
    num_examples: int,
    load: Callable[[tuple[int, bool, int]], dict[str, Any]],
    *,
    batch_size: int,
    train: bool,
    seed: int,
    num_epochs: int | None,
    shard_index: int | None,
    shard_count: int | None,
    read_options: grain.ReadOptions | None,
) -> grain.IterDataset:
    """This host's plan, loaded, corrupt examples counted (and dropped in training), batched."""
    shard_index, shard_count = host_shard(shard_index, shard_count)
    plan = _index_plan(num_examples, train=train, seed=seed, num_epochs=num_epochs, shard_index=shard_index,
                       shard_count=shard_count, batch_size=batch_size)
    ds = plan.map(load).to_iter_dataset(read_options or grain.ReadOptions(num_threads=4))
    return _CountSkipped(ds, drop=train).batch(batch_size, drop_remainder=train)


class _CountSkippedIterator(grain.DatasetIterator):
    """Drops (training) or keeps (evaluation) corrupt elements and counts them in its checkpointed state."""

    def __init__(self, parent: grain.DatasetIterator, drop: bool):
        super().__init__(parent)
        self._drop = drop
        self._skipped = 0

    def __next__(self) -> dict[str, Any]:
        while True:
            element = next(self._parent)
            if element.pop(_CORRUPT):
                self._skipped += 1
                if self._drop:
                    continue
            return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), SKIPPED_STATE_KEY: self._skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = int(state[SKIPPED_STATE_KEY])


class _CountSkipped(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, drop: bool):
        super().__init__(parent)
        self._drop = drop

    def __iter__(self) -> _CountSkippedIterator:
        return _CountSkippedIterator(self._parent.__iter__(), self._drop)


def make_dataset(
    source: Sequence[Mapping[str, Any]],
    example_fn: ExampleFn,
    *,
    batch_size: int,
    image_size: int,
    train: bool,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    image_fn: ImageFn | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """A batched grain dataset for one host; `iter()` it for a checkpointable iterator.

    `num_epochs` (training only) defaults to repeating forever; evaluation is one pass. The
    iterator's `get_state()` / `set_state()` resume exactly, mid-epoch included.
    """
    image_fn = image_fn or default_image_fn(image_size, train)

    def image(record: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray | None:
        if not bool(record.get("has_image", True)):
            return None  # text-only example (e.g. a LLaVA conversation without picture)
        return image_fn(decode_image(record.get("image", b"")), rng)

    load = _loader(source, example_fn, image, key="image", blank_shape=(image_size, image_size, 3),
                   errors=CorruptImageError, train=train, seed=seed)
    return _batched(len(source), load, batch_size=batch_size, train=train, seed=seed, num_epochs=num_epochs,
                    shard_index=shard_index, shard_count=shard_count, read_options=read_options)


def num_skipped(iterator: grain.DatasetIterator) -> int:
    """Corrupt examples this iterator has met so far (restored with its state)."""

    def find(state: Any) -> int | None:
        if isinstance(state, Mapping):
            if SKIPPED_STATE_KEY in state:
                return int(state[SKIPPED_STATE_KEY])
            for value in state.values():
                found = find(value)
                if found is not None:
                    return found
        return None

    found = find(iterator.get_state())
    if found is None:
        raise ValueError("this iterator does not come from make_dataset")
    return found


# ----------------------------------------------------------------------------------------------
# Video clips
# ----------------------------------------------------------------------------------------------

ClipFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def default_clip_fn(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (T, S, S, 3) -> float32 normalised with CLIP's mean/std; the release augments video frames no further."""
    return normalize(frames)


def make_clip_dataset(
    source: Sequence[Mapping[str, Any]],
    example_fn: ExampleFn,
    *,
    batch_size: int,
    train: bool,
    video_root: str | os.PathLike,
    num_frm: int = 8,
    strategy: str = "rand",
    frame_size: int = 224,
    resize: str = "square",
    target_fps: float = DIDEMO_TARGET_FPS,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    clip_fn: ClipFn | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """`make_dataset` for video records ({"video": path relative to video_root, ...}): batches carry
    "video" (B, num_frm, frame_size, frame_size, 3) float32 and "valid", plus the example fields.

    Frames are sampled by `strategy` with the example's rng (a function of seed, epoch and index) and
    decoded at load time; a clip that cannot give them (missing, broken, too short) is dropped in
    training and padded with valid 0 in evaluation, counted in `num_skipped` either way.
    """
    from aurora_jax.data.video import read_clip  # local import: image pipelines never need PyAV

    root, clip_fn = os.fspath(video_root), clip_fn or default_clip_fn

    def clip(record: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
        path = os.path.join(root, as_text(record["video"]))
        frames = read_clip(path, frame_size, num_frm=num_frm, strategy=strategy, rng=rng, resize=resize,
                           target_fps=target_fps)
        return clip_fn(frames, rng)

    load = _loader(source, example_fn, clip, key="video", blank_shape=(num_frm, frame_size, frame_size, 3),
                   errors=VideoError, train=train, seed=seed)
    return _batched(len(source), load, batch_size=batch_size, train=train, seed=seed, num_epochs=num_epochs,
                    shard_index=shard_index, shard_count=shard_count, read_options=read_options)
