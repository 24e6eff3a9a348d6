"""Multi-host runs: `jax.distributed.initialize` from explicit flags or the cluster's environment, and the few
cross-host helpers the trainer needs (who writes, who prepares first, gathering host-local JSON).

Call `initialize` before anything touches a device (`jax.devices()`, a jit, an array).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("aurora_jax")


def cluster_kind(env: dict[str, str] | None = None) -> str:
    """'slurm' or 'tpu' when the environment is a multi-process job that JAX can read itself, else ''."""
    env = dict(os.environ if env is None else env)
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_PROCID" in env:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return ""


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """Join a multi-process job; True when one was joined. Explicit arguments win over the environment.

    CPU processes talk through gloo (for tests on one machine and CPU clusters).
    """
    if coordinator:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--coordinator {coordinator} needs --num_processes >= 1 and 0 <= --process_id < it, "
                             f"got {num_processes} and {process_id}")
        kwargs: dict[str, Any] = dict(coordinator_address=coordinator, num_processes=num_processes,
                                      process_id=process_id)
    elif cluster_kind():
        kwargs = {}  # JAX reads SLURM / Cloud TPU environments itself
    else:
        return False
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Process 0 writes logs, JSON and plots; every process takes part in checkpoints."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
    """Process 0 runs the block first (it writes shared files: tfds records, vocabularies), then the others."""
    if not is_primary():
        sync(name)
    yield
    if is_primary():
        sync(name)


def allgather_json(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serialisable), in process order."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(rows[i, : lengths[i]]).decode()) for i in range(len(lengths))]
