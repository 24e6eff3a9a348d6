"""Orbax checkpoints of what trains: trainable params, optimizer state, step, RNG and the data iterator.

The frozen base model is not copied into each checkpoint; its source path is recorded in the run's config.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from aurora_jax.parallel.distributed import allgather_json


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

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def quarantine(self, step: int, folder: str) -> str:
        """Move an unreadable step out of the manager's sight (into `folder`), keeping its files for inspection."""
        os.makedirs(folder, exist_ok=True)
        dst = os.path.join(folder, str(step))
        n = 1
        while os.path.exists(dst):
            dst = os.path.join(folder, f"{step}.{n}")
            n += 1
        shutil.move(os.path.join(self.directory, str(step)), dst)
        self.manager.reload()
        return dst

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
        # The train step donates its state: the async writer gets a copy, or it could read reused buffers.
        state = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:  # each host's iterator position, in one file that process 0 writes
            args["data"] = ocp.args.JsonSave({"hosts": allgather_json(data_state)})
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any = None, *, with_data: bool = True) -> tuple[Any, dict | None]:
        """Restore `state` shaped and sharded like `abstract_state` (a tree of ShapeDtypeStruct or arrays);
        None restores the tree as saved (nested dicts of host arrays), as reading a run back needs."""
        target = None if abstract_state is None else jax.tree_util.tree_map(_as_abstract, abstract_state)
        args = {"state": ocp.args.StandardRestore(target)}
        has_data = with_data and os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out["state"], (_this_host(out["data"], step) if has_data else None)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _this_host(data: dict, step: int) -> dict:
    """This process's iterator state from a checkpoint's per-host list (older checkpoints hold one state)."""
    if "hosts" not in data:
        return data
    hosts = data["hosts"]
    if len(hosts) != jax.process_count():
        raise ValueError(f"checkpoint step {step} holds the data positions of {len(hosts)} hosts, this run has "
                         f"{jax.process_count()}: resume with the same number of processes")
    return hosts[jax.process_index()]


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
