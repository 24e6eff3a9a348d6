"""Entry point: python -m aurora_jax.convert <source> --src PATH --dst DIR [...]."""

import sys

from aurora_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
