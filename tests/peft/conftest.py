"""Session fixtures: tiny BLIP params (built once, jitted) and randomised Aurora adapters."""

from __future__ import annotations

import jax
import pytest

from aurora_jax.peft import PeftConfig, init_adapter
from tests.fixtures import RANK, TINY_RETRIEVAL, TINY_VQA, fast_init, trained_adapter


@pytest.fixture(scope="session")
def retrieval_params():
    return fast_init(TINY_RETRIEVAL, 0)


@pytest.fixture(scope="session")
def vqa_params():
    return fast_init(TINY_VQA, 1)


def _adapter(params, cfg, seed):
    return trained_adapter(init_adapter(params, cfg, jax.random.key(seed)), seed)


@pytest.fixture(scope="session")
def aurora_cfg():
    return PeftConfig(rank=RANK)


@pytest.fixture(scope="session")
def retrieval_adapter(retrieval_params, aurora_cfg):
    """Aurora (dense core) with V and GQT randomised, so every term matters."""
    return _adapter(retrieval_params, aurora_cfg, 2)


@pytest.fixture(scope="session")
def vqa_adapter(vqa_params, aurora_cfg):
    return _adapter(vqa_params, aurora_cfg, 3)
