"""Train (and evaluate) any recipe: `python -m aurora_jax.train --config configs/<name>.py --workdir DIR`.

The config names its recipe (`config.recipe`: "blip" or "owl"). Any key can be overridden on the command line
(`--config.optim.lr=1e-4`); unknown keys and bad values are refused before any work starts. Running it again
with the same --workdir resumes. `config.then` chains another config file, run in <workdir>/<its name>.
"""

from __future__ import annotations

import logging
import os
import re
import runpy
import sys
from collections.abc import Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from aurora_jax.data.records import AnnotationError
from aurora_jax.parallel import distributed
from aurora_jax.train.config import recipe_module, validate
from aurora_jax.train.loop import NonFiniteError, train
from aurora_jax.train.workdir import BaseMismatch, WorkdirBusy

FLAGS = flags.FLAGS


def setup_logging() -> None:
    """INFO lines of aurora_jax on stdout; orbax and tfds (chatty at INFO through absl) only from WARNING."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("aurora_jax")
    if not logger.handlers:  # absl owns the root logger's handler, so ours goes on the package logger
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if distributed.is_primary() else logging.WARNING)
    logger.propagate = False


def chained_runs(config, workdir: str, root: str) -> list[tuple]:
    """(config, workdir) of the run and of every config it chains with `then` (paths relative to `root`)."""
    runs = [(config, workdir)]
    while runs[-1][0].then:
        path = os.path.join(root, runs[-1][0].then)
        nxt = runpy.run_path(path)["get_config"]()
        validate(nxt)
        runs.append((nxt, os.path.join(workdir, os.path.splitext(os.path.basename(path))[0])))
    return runs


def print_results(config, results: dict) -> None:
    s = results["summary"]
    print(f"\n== {recipe_module(config.recipe).describe(config)}: trainable params {s['trainable']:,} || "
          f"all params {s['total']:,} || trainable% {s['percent']:.4f}")
    for when, name in (("before", "zero-shot"), ("after", "tuned")):
        if when in results:
            print(f"{name:>9}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[when].items()))
    if "export" in results:
        print(f"   export: {results['export']}")


def main(argv: Sequence[str]) -> None:
    del argv
    # Before anything touches a device: explicit flags, or SLURM / Cloud TPU environments.
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    setup_logging()
    config = FLAGS.config
    try:
        validate(config)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    workdir = FLAGS.workdir or os.path.join("runs", os.path.splitext(
        os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(config_flags.get_config_filename(FLAGS["config"]))))
    for cfg, wd in chained_runs(config, workdir, root):
        try:
            results = train(cfg, wd)
        except (NonFiniteError, WorkdirBusy, BaseMismatch, AnnotationError) as e:  # the message says it all
            raise SystemExit(f"error: {e}") from None
        if distributed.is_primary():
            print_results(cfg, results)


def override_error(argv: Sequence[str], error: Exception) -> str:
    """One line for a mistyped `--config.a.b=v`: ml_collections raises a KeyError with its suggestion inside."""
    text = str(error.args[0] if error.args else error).replace("\\'", "'")
    bad = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    for arg in argv:
        m = re.match(r"--config\.([\w.]+)", arg)
        if m and bad and bad.group(1) in m.group(1).split("."):
            key = m.group(1)
            msg = f"unknown config key {key!r} (in {arg})"
            if hint:
                parts = key.split(".")
                parts[parts.index(bad.group(1))] = hint.group(1)
                msg += f"; did you mean {'.'.join(parts)!r}?"
            return msg
    return text.splitlines()[0]


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parsing, with config errors as one line and exit status 2 instead of a traceback."""
    try:
        return FLAGS(list(argv))
    except flags.Error as e:
        raise SystemExit(f"error: {e}") from None
    except (KeyError, AttributeError) as e:
        raise SystemExit(f"error: {override_error(argv, e)}") from None


def run(default_config: str | None = None) -> None:
    """Define the flags and run `main` (train.py passes the demo config as the default)."""
    try:  # with a default, the config file and its overrides are read right here
        config_flags.DEFINE_config_file("config", default_config, "experiment config file (configs/*.py)")
    except (KeyError, AttributeError) as e:
        raise SystemExit(f"error: {override_error(sys.argv, e)}") from None
    flags.DEFINE_string("workdir", "", "run directory (checkpoints, metrics, export); default runs/<config name>")
    flags.DEFINE_string("coordinator", "", "multi-process run: host:port of process 0 (SLURM and Cloud TPU "
                        "jobs are detected without it)")
    flags.DEFINE_integer("num_processes", 0, "multi-process run: the number of processes")
    flags.DEFINE_integer("process_id", -1, "multi-process run: this process's index")
    if default_config is None:
        flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
