"""Entry point: python -m aurora_jax.convert <source> --src PATH --dst DIR [...]."""

import sys

from aurora_jax.convert.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:  # a refused input: one line, no traceback
        sys.exit(f"error: {e}")
