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
fields of the example function. The number of corrupt examples met so far is part of the iterator
state (`num_skipped(iterator)`), so it survives checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from aurora_jax.data.examples import ExampleFn
from aurora_jax.data.transforms import CorruptImageError, decode_image, test_transform, train_transform

ImageFn = Callable[[Image.Image, np.random.Generator], np.ndarray]
_CORRUPT = "_corrupt"  # internal element key, consumed by the counting iterator
SKIPPED_STATE_KEY = "num_skipped"


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


def _loader(
    source: Sequence[Mapping[str, Any]],
    example_fn: ExampleFn,
    image_fn: ImageFn,
    image_size: int,
    *,
    train: bool,
    seed: int,
) -> Callable[[tuple[int, bool, int]], dict[str, Any]]:
    """The map from a planned (source index, valid, epoch) to an example dict."""

    def load(planned: tuple[int, bool, int]) -> dict[str, Any]:
        index, valid, epoch = planned
        rng = np.random.default_rng([seed, epoch, index])
        record = source[index]
        data = record.get("image", b"")
        corrupt = False
        if bool(record.get("has_image", True)):
            try:
                image = image_fn(decode_image(data), rng)
            except CorruptImageError:
                if train:
                    return {_CORRUPT: True}
                corrupt, image = True, None
        else:
            image = None  # text-only example (e.g. a LLaVA conversation without picture)
        if image is None:
            image = np.zeros((image_size, image_size, 3), np.float32)
        out = dict(example_fn(record, rng))
        out["image"] = np.asarray(image, np.float32)
        out["valid"] = np.int32(valid and not corrupt)
        out[_CORRUPT] = corrupt
        return out

    return load


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
    shard_index, shard_count = host_shard(shard_index, shard_count)
    n = len(source)
    plan = _index_plan(
        n,
        train=train,
        seed=seed,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        batch_size=batch_size,
    )
    load = _loader(
        source,
        example_fn,
        image_fn or default_image_fn(image_size, train),
        image_size,
        train=train,
        seed=seed,
    )
    ds = plan.map(load).to_iter_dataset(read_options or grain.ReadOptions(num_threads=4))
    return _CountSkipped(ds, drop=train).batch(batch_size, drop_remainder=train)


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
