"""Recipes: what a model family adds to the family-free engine (`train.loop`).

A recipe is one object with the methods of `Recipe`, exported by its module as `RECIPE` and named by
`config.recipe`. The engine calls them in this order:

    base_config / validate     the family's config keys and their checks (`train.config` merges and runs them)
    peft_config                the PeftConfig the run trains with (stage rules included)
    tokenizer                  from the converted checkpoint or, for generated data, written to the workdir
    load_base                  (model config, base params), restored into the mesh's shardings where it can
    abstract_params / model    the model's parameter tree (logical axes) and the Flax module computing in dtype
    model_config / batch_layout  the model config and the training batch's shapes without weights or data (aot)
    data                       train iterator (`.train`, `.steps_per_epoch`) and whatever evaluation needs
    loss                       task_loss(fwd, batch, rng, base[, teacher]) for `train.state.make_train_step`
    extend_state               optional extra state (BLIP's momentum model and queues); abstract_extend_state: the same
                               on ShapeDtypeStructs
    evaluate                   metrics of a state
    export                     formats other than the shared converted one (HF folders, HF PEFT adapters, and
                               "aurora", the adapter alone, which the base class writes for recipes listing it)

Adding a model family = one module here with a `Recipe` subclass, and its name in `train.config.RECIPES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections as mlc

from aurora_jax.data.text import write_word_vocab
from aurora_jax.peft import PeftConfig
from aurora_jax.peft.store import save_adapter, trained_base_leaves


class Recipe:
    """The interface; methods with a body are optional."""

    name = ""
    export_formats: tuple[str, ...] = ()  # besides "converted"

    def base_config(self) -> mlc.ConfigDict:
        raise NotImplementedError

    def validate(self, c: mlc.ConfigDict) -> list[str]:
        """Error messages (naming the key) for the family's keys; [] when all is well."""
        raise NotImplementedError

    def peft_config(self, c: mlc.ConfigDict) -> PeftConfig:
        return PeftConfig.from_dict(c.peft)

    def tokenizer(self, c: mlc.ConfigDict, workdir: str) -> Any:
        raise NotImplementedError

    def load_base(self, c: mlc.ConfigDict, tokenizer: Any, workdir: str, shardings_for=None) -> tuple[Any, dict]:
        """(model config, base params). `shardings_for(model config)` gives the mesh's shardings to restore into
        (None: host arrays, as reading a run back wants)."""
        raise NotImplementedError

    def abstract_params(self, cfg: Any, *, boxed: bool = False) -> dict:
        raise NotImplementedError

    def model_config(self, c: mlc.ConfigDict, tokenizer: Any) -> Any:
        """The model config `load_base` returns, read without any weight (ahead-of-time compiles)."""
        raise NotImplementedError

    def batch_layout(self, c: mlc.ConfigDict, cfg: Any) -> dict[str, Any]:
        """The global training batch as ShapeDtypeStructs: what `data(...).train` yields, per key."""
        raise NotImplementedError

    def with_compute(self, cfg: Any, c: mlc.ConfigDict) -> Any:
        """The model config computing as the run asks (dtype, remat, kernels)."""
        raise NotImplementedError

    def model(self, cfg: Any) -> Any:
        raise NotImplementedError

    def data(self, c: mlc.ConfigDict, tokenizer: Any, cfg: Any, workdir: str) -> Any:
        raise NotImplementedError

    def loss(self, c: mlc.ConfigDict, cfg: Any, peft_cfg: PeftConfig, data: Any):
        raise NotImplementedError

    def train_step_options(self, c: mlc.ConfigDict) -> dict[str, Any]:
        """Keywords of `train.state.make_train_step` besides the loss (e.g. the momentum EMA)."""
        return {}

    def extend_state(self, c: mlc.ConfigDict, cfg: Any, state: Any, frozen: Any, base_sh: dict, mesh) -> Any:
        """Extra train state (e.g. a momentum model); the default adds nothing."""
        return state

    def abstract_extend_state(self, c: mlc.ConfigDict, cfg: Any, state: Any, frozen: Any, base_sh: dict, mesh) -> Any:
        """`extend_state` on ShapeDtypeStructs, reading no weights (`train.state.abstract_state`)."""
        return state

    def evaluate(self, run: Any, state: Any) -> dict[str, float]:
        raise NotImplementedError

    def export(self, fmt: str, dst: str, cfg: Any, merged: dict | None, rest: dict, *, drop_gqt: bool = False,
               adapter: dict | None = None, peft_cfg: PeftConfig | None = None, base: dict | None = None) -> None:
        """Write `fmt` to dst. `merged`, `rest`: `peft.merge`'s output (None and {} for the ADAPTER_FORMATS,
        which are written from the unmerged `adapter`, `peft_cfg` and `base`, the base with the trained leaves).
        The shared "aurora" format is handled here for recipes that list it."""
        if fmt == "aurora" and fmt in self.export_formats:
            export_aurora(dst, cfg, adapter, peft_cfg, base)
            return
        formats = ", ".join(("converted", *self.export_formats))
        raise ValueError(f"recipe {self.name!r} exports {formats}; not {fmt!r}")

    def describe(self, c: mlc.ConfigDict) -> str:
        """A short label for progress bars and result lines."""
        return self.name

    def headline(self, c: mlc.ConfigDict) -> tuple[str, ...]:
        """The metrics a comparison table shows."""
        return ()


ADAPTER_FORMATS = ("peft", "aurora", "release")  # the adapter alone: written unmerged (no merge)


def export_aurora(dst: str, cfg: Any, adapter: dict | None, peft_cfg: PeftConfig | None, base: dict | None) -> None:
    """`--format aurora`: an Aurora adapter + the base leaves trained with it (`peft.store`), for any family."""
    if adapter is None or peft_cfg is None or base is None:
        raise ValueError("--format aurora needs the unmerged adapter, its PeftConfig and the base params")
    if peft_cfg.method != "aurora":
        hint = "--format peft" if peft_cfg.method == "lora" else "--format converted (or hf)"
        raise ValueError(f"--format aurora holds Aurora adapters; this run trained peft.method={peft_cfg.method!r}: "
                         f"use {hint}")
    save_adapter(dst, adapter, peft_cfg, base_leaves=trained_base_leaves(base, peft_cfg), model_config=cfg)


def peft_config_dict(**overrides: Any) -> mlc.ConfigDict:
    """`config.peft`: every PeftConfig field at its default, then the family's overrides (one source of defaults)."""
    return mlc.ConfigDict({**PeftConfig().to_dict(), **overrides})


def word_vocab_tokenizer(workdir: str, words: Iterable[str], load: Callable[[str], Any]) -> Any:
    """For generated data and a random-init model: a word-level vocab.txt written once to <workdir>/tokenizer."""
    folder = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(folder, "vocab.txt")):
        write_word_vocab(words, folder)
    return load(folder)
