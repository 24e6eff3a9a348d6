"""Train (and evaluate) a PEFT method: `python train.py --config configs/<name>.py --workdir DIR`.

The same CLI as `python -m aurora_jax.train` (any recipe: BLIP or mPLUG-Owl), with the offline demo
(configs/demo.py) as the default config. Any config key can be overridden on the command line
(`--config.optim.lr=1e-4`); unknown keys and bad values are refused before any work starts. Running it again
with the same --workdir resumes.
"""

import os

from aurora_jax.train.__main__ import run

if __name__ == "__main__":
    run(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py"))
