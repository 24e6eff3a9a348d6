"""Train (and evaluate) a PEFT method on BLIP: `python train.py --config configs/<name>.py --workdir DIR`.

Any config key can be overridden on the command line (`--config.optim.lr=1e-4`); unknown keys and bad
values are refused before any work starts. Running it again with the same --workdir resumes.
With no flags it runs the offline demo (configs/demo.py).
"""

from __future__ import annotations

import logging
import os
import runpy
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "demo.py"), "experiment config file")
flags.DEFINE_string("workdir", "", "run directory (checkpoints, metrics); default runs/<config name>")


def main(argv) -> None:
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds are chatty at INFO
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    from aurora_jax.train.config import validate

    config = flags.FLAGS.config
    validate(config)
    workdir = flags.FLAGS.workdir or os.path.join("runs", os.path.splitext(
        os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0])
    from aurora_jax.train.loop import train

    runs = [(config, workdir)]
    while runs[-1][0].then:  # chained configs (the demo: retrieval, then VQA)
        path = os.path.join(_HERE, runs[-1][0].then)
        nxt = runpy.run_path(path)["get_config"]()
        validate(nxt)
        runs.append((nxt, os.path.join(workdir, os.path.splitext(os.path.basename(path))[0])))
    for cfg, wd in runs:
        print_results(cfg, train(cfg, wd))


def print_results(config, results: dict) -> None:
    s = results["summary"]
    print(f"\n== {config.task} with {config.peft.method}: trainable params {s['trainable']:,} || "
          f"all params {s['total']:,} || trainable% {s['percent']:.4f}")
    for when, label in (("before", "zero-shot"), ("after", "tuned")):
        if when in results:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in results[when].items())
            print(f"{label:>9}: {shown}")


if __name__ == "__main__":
    app.run(main)
