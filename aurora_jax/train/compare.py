"""Compare PEFT methods on one task, as the paper's tables do: trainable parameters vs the metric.

`python -m aurora_jax.train.compare --config configs/demo.py --workdir runs/compare [--methods ...]`
trains each method from the same backbone on the same data and prints a Markdown table (also written
to <workdir>/comparison.md and comparison.json).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy

import ml_collections as mlc

from aurora_jax.train.config import recipe_module
from aurora_jax.train.loop import train

# Learning rates per method: full fine-tuning needs a smaller step than the small adapters.
DEFAULT_LR = {"frozen": 1e-2, "full": 1e-4, "lora": 1e-2, "aurora": 1e-2}


def method_config(base: mlc.ConfigDict, method: str) -> mlc.ConfigDict:
    c = mlc.ConfigDict(base.to_dict())
    c.peft.method = method
    c.optim.lr = DEFAULT_LR[method]
    c.eval.at_start = method == "frozen"  # the zero-shot row is measured once
    return c


def compare(base: mlc.ConfigDict, workdir: str, methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        res = train(method_config(base, method), os.path.join(workdir, method), progress=False)
        if "before" in res:
            rows.append({"method": "zero-shot", "trainable": 0, "percent": 0.0, **res["before"]})
        rows.append({"method": method, "trainable": res["summary"]["trainable"],
                     "percent": res["summary"]["percent"], **res["after"]})
    return rows


def markdown(rows: list[dict], keys: tuple[str, ...]) -> str:
    head = "| method | trainable params | trainable % | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (3 + len(keys))]
    for r in rows:
        vals = " | ".join(f"{r[k]:.2f}" for k in keys)
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['percent']:.3f} | {vals} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py"))
    p.add_argument("--workdir", default="runs/compare")
    p.add_argument("--methods", nargs="+", default=["frozen", "full", "lora", "aurora"])
    a = p.parse_args(argv)
    base = runpy.run_path(a.config)["get_config"]()
    rows = compare(base, a.workdir, a.methods)
    table = markdown(rows, recipe_module(base.recipe).headline(base))
    os.makedirs(a.workdir, exist_ok=True)
    with open(os.path.join(a.workdir, "comparison.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.workdir, "comparison.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
