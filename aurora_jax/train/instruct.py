"""Replaced by the one CLI: `python -m aurora_jax.train --config configs/owl_*.py --workdir DIR`.

Kept so that `python -m aurora_jax.train.instruct ...` still works; the Owl recipe is
`aurora_jax.train.recipes.owl`.
"""

import sys

from aurora_jax.train.__main__ import run

if __name__ == "__main__":
    print("note: aurora_jax.train.instruct is now `python -m aurora_jax.train` (the Owl configs name their recipe)",
          file=sys.stderr)
    run()
