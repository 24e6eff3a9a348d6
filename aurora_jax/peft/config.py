"""`PeftConfig`: one switch (`method`) between Aurora, LoRA, full fine-tuning and a frozen backbone."""

from __future__ import annotations

import dataclasses
import re

from aurora_jax.config_base import ConfigBase

METHODS = ("aurora", "lora", "full", "frozen")
CORES = ("dense", "diagonal")


@dataclasses.dataclass(frozen=True)
class PeftConfig(ConfigBase):
    """Hyper-parameters of every method; fields of the other methods are ignored.

    A run's `config.peft` holds exactly these fields (their defaults are built from this class), so
    `PeftConfig.from_dict(config.peft)` works.
    """

    method: str = "aurora"
    # Aurora (mode approximation + GQT)
    rank: int = 32
    core: str = "dense"  # "dense": the release's R x R x R core; "diagonal": strict CP (one length-R vector)
    dropout: float = 0.1  # on the rank-R bottleneck
    scale: float = 1.0
    sites: str = ""  # regex searched in '/'-joined Dense paths; "" = every site the release adapts
    gqt: bool = True
    gqt_weight: float = 0.1
    ice: bool = True  # read by the retrieval loss; ICE has no parameters
    ice_weight: float = 0.1
    # LoRA (HF peft vocabulary)
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    # a str is a regex full-matched against a Dense's name or its whole path; a tuple of names is
    # matched as path suffixes, as HF peft does with a list of target_modules
    lora_targets: str | tuple[str, ...] = "query|value|qkv"
    # base parameters that train with the adapter (prefixes of '/'-joined base paths). The release trains
    # vision_proj and itm_head and (by a typo) leaves text_proj frozen: add "text_proj" to train it.
    train_heads: tuple[str, ...] = ("vision_proj", "itm_head")
    train_temp: bool = False  # "full" trains every base leaf except the ITC temperature unless this is set

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose from {METHODS}")
        if self.core not in CORES:
            raise ValueError(f"core={self.core!r}: choose from {CORES}")
        for name in ("rank", "lora_r"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("dropout", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        re.compile(self.sites)
        if isinstance(self.lora_targets, str):
            re.compile(self.lora_targets)
        # lists (from ml_collections / JSON) become tuples so the config stays hashable
        for name in ("lora_targets", "train_heads"):
            value = getattr(self, name)
            if not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_r
