"""Orbax checkpoints of what trains: trainable params, optimizer state, step, RNG and the data iterator.

The frozen base model is not copied into each checkpoint; its source path is recorded in the run's config.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Async orbax CheckpointManager keeping the last `keep` steps; restores onto abstract (sharded) targets."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        # The train step donates its state: the async writer gets a copy, or it could read reused buffers.
        state = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, *, with_data: bool = True) -> tuple[Any, dict | None]:
        """Restore `state` shaped and sharded like `abstract_state` (a tree of ShapeDtypeStruct or arrays)."""
        target = jax.tree_util.tree_map(_as_abstract, abstract_state)
        args = {"state": ocp.args.StandardRestore(target)}
        has_data = with_data and os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out["state"], (out["data"] if has_data else None)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
