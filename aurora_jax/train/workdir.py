"""Safety of a run directory: one run at a time (a lock held for the run's life) and the identity of the backbone
its checkpoints were trained on (a resume onto another backbone is refused)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
from typing import Any

import ml_collections as mlc

log = logging.getLogger("aurora_jax")

LOCK_FILE = ".lock"
IDENTITY_FILE = "base_identity.json"
# What identifies a converted checkpoint without reading its arrays: its config and orbax's tree metadata and
# manifest (the manifest names the data files, which change with every write).
FINGERPRINT_FILES = ("aurora_config.json", "params/_METADATA", "params/manifest.ocdbt")


class WorkdirBusy(RuntimeError):
    """Another live process holds the run directory."""


class BaseMismatch(ValueError):
    """A resume would put the checkpoints' adapter on another backbone."""


class WorkdirLock:
    """An exclusive `flock` on <workdir>/.lock, holding the owner's pid; the OS releases it when the owner dies,
    so a stale lock is taken over (and said so)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by another run (pid {holder}); "
                                  "wait for it or choose another --workdir") from None
            raise
        f.seek(0)
        previous = f.read().strip()
        if previous and previous != str(os.getpid()):
            log.warning("took over the lock of %s left by pid %s, which is gone", self.path, previous)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def base_identity(config: mlc.ConfigDict) -> dict[str, Any]:
    """{'init': path or 'random-init', 'fingerprint': sha256} of the backbone a config trains on.

    A converted folder is fingerprinted by its config and orbax metadata (no arrays read); a random init by the
    model keys and the seed that generate it.
    """
    init = config.get("model", {}).get("init", "")
    h = hashlib.sha256()
    if init:
        for name in FINGERPRINT_FILES:
            path = os.path.join(init, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        return {"init": os.path.abspath(init), "fingerprint": h.hexdigest()}
    model = config.model.to_dict()
    model.pop("scan_layers", None)  # a layout of the same weights: a run may resume in the other one
    h.update(json.dumps({"model": model, "seed": config.seed}, sort_keys=True, default=str).encode())
    return {"init": "random-init", "fingerprint": h.hexdigest()}


def check_base_identity(workdir: str, config: mlc.ConfigDict, *, resuming: bool, write: bool = True) -> None:
    """Record the backbone of a new run (when `write`); refuse a resume onto another one unless
    `resume.allow_new_base`."""
    path = os.path.join(workdir, IDENTITY_FILE)
    now = base_identity(config)
    if resuming and os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored == now:
            return
        if not config.resume.allow_new_base:
            raise BaseMismatch(
                f"{workdir} was trained on {stored['init']} (fingerprint {stored['fingerprint'][:12]}), not on "
                f"{now['init']} ({now['fingerprint'][:12]}): resuming would put its adapter on another backbone. "
                "Use another --workdir, or pass --config.resume.allow_new_base=True to do it on purpose")
        log.warning("resuming %s on a new backbone %s (resume.allow_new_base)", workdir, now["init"])
    if not write:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(now, f, indent=2)
    os.replace(tmp, path)
