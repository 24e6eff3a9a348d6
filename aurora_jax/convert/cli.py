"""`python -m aurora_jax.convert <source> --src PATH --dst DIR [...]`: dispatch through a lazy registry.

A source is "module:function" where function(argv: list[str]) -> int parses its own arguments
(`base_parser` gives the shared ones) and writes a converted folder. Modules are imported only when
their source is asked for, so a missing or broken one does not affect the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

SOURCES: dict[str, str] = {
    "blip": "aurora_jax.convert.blip:cli",
    "aurora-release": "aurora_jax.convert.aurora_release:cli",
    "llama": "aurora_jax.convert.llama:cli",
    "mplug-owl": "aurora_jax.convert.owl:cli_v1",
    "mplug-owl2": "aurora_jax.convert.owl:cli_v2",
}

DTYPES = ("float32", "bfloat16", "float16")


def register(name: str, target: str) -> None:
    """Add (or replace) a source: target is 'module:function' with function(argv) -> int."""
    if ":" not in target:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    SOURCES[name] = target


def resolve(name: str) -> Callable[[list[str]], int]:
    """The CLI function of a registered source; a clear error if it is unknown or cannot be imported."""
    if name not in SOURCES:
        raise SystemExit(f"unknown source {name!r}; registered sources: {', '.join(sorted(SOURCES))}")
    module, _, func = SOURCES[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            raise SystemExit(
                f"source {name!r} is registered as {SOURCES[name]} but module {module} does not exist yet"
            ) from e
        raise
    if not hasattr(mod, func):
        raise SystemExit(f"source {name!r}: module {module} has no function {func!r}")
    return getattr(mod, func)


def base_parser(source: str, description: str = "") -> argparse.ArgumentParser:
    """The arguments every source shares: --src, --dst, --dtype, --force, --no-compress, --no-progress."""
    p = argparse.ArgumentParser(prog=f"python -m aurora_jax.convert {source}", description=description)
    p.add_argument("--src", required=True, help="checkpoint file, shard index, or HF-style folder")
    p.add_argument("--dst", required=True, help="output folder (orbax params + aurora_config.json)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the floating-point params")
    p.add_argument("--force", action="store_true", help="overwrite an existing converted folder")
    p.add_argument("--no-compress", dest="compress", action="store_false",
                   help="write the arrays without zstd: less CPU, larger output (1.3-1.5x in bench_convert)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _usage() -> str:
    lines = ["usage: python -m aurora_jax.convert <source> --src PATH --dst DIR [options]", "", "sources:"]
    lines += [f"  {name:12s} {target}" for name, target in sorted(SOURCES.items())]
    lines += ["", "python -m aurora_jax.convert <source> --help lists a source's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    return int(resolve(argv[0])(argv[1:]) or 0)
