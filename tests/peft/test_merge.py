"""Merged weights reproduce the unmerged (activation-path) model; GQT survives as the leftover adapter."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from aurora_jax.models.blip import Blip
from aurora_jax.peft import PeftConfig, init_adapter, merge, tuned_apply
from tests.fixtures import RANK, TINY_RETRIEVAL, TINY_VQA, blip_inputs, max_rel_err, trained_adapter

TOL = 1e-5


def _outputs(model, params, adapter, cfg):
    pixels, ids, mask = blip_inputs()
    run = lambda *a, method: tuned_apply(model, params, adapter, cfg, *a, method=method)  # noqa: E731
    if model.cfg.task == "vqa":
        return [run(pixels, ids, mask, ids, mask, method=Blip.vqa_logits)]
    return [run(pixels, ids, mask, method=Blip.itm), run(pixels, ids, mask, method=Blip.itc)]


def _changed(before, after) -> set:
    flat = lambda t: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    a, b = flat(before), flat(after)
    return {k for k in a if not np.array_equal(a[k], b[k])}


@pytest.mark.parametrize("task,core", [("retrieval", "dense"), ("vqa", "diagonal")])
def test_aurora_merge(task, core, retrieval_params, vqa_params):
    params, model_cfg = (retrieval_params, TINY_RETRIEVAL) if task == "retrieval" else (vqa_params, TINY_VQA)
    model = Blip(model_cfg)
    cfg = PeftConfig(rank=RANK, core=core)
    adapter = trained_adapter(init_adapter(params, cfg, jax.random.key(7)), 7)
    merged, rest = merge(params, adapter, cfg)
    assert set(rest) == {"gqt"}  # GQT acts on activations and stays an adapter
    changed = _changed(params, merged)
    assert changed and all(k.endswith("['kernel']") for k in changed)
    assert all(any(f"['{n}']" in k for n in ("qkv", "proj", "fc1", "fc2", "query", "key", "value"))
               for k in changed)
    for got, want in zip(_outputs(model, merged, rest, cfg), _outputs(model, params, adapter, cfg), strict=True):
        assert max_rel_err(got, want) < TOL


def test_lora_merge(retrieval_params):
    model = Blip(TINY_RETRIEVAL)
    cfg = PeftConfig(method="lora", lora_r=2, lora_alpha=4.0, lora_targets=("qkv", "query", "value", "fc2"))
    adapter = init_adapter(retrieval_params, cfg, jax.random.key(0))
    # B = 0 at init: LoRA starts exactly at the base model
    for got, want in zip(_outputs(model, retrieval_params, adapter, cfg),
                         _outputs(model, retrieval_params, {}, cfg), strict=True):
        np.testing.assert_array_equal(got, want)
    adapter = trained_adapter(adapter, 1, v_std=0.2)
    merged, rest = merge(retrieval_params, adapter, cfg)
    assert rest == {}
    unmerged = _outputs(model, retrieval_params, adapter, cfg)
    assert max_rel_err(unmerged[0], _outputs(model, retrieval_params, {}, cfg)[0]) > 1e-2
    plain = [model.apply({"params": merged}, *blip_inputs(), method=m) for m in (Blip.itm, Blip.itc)]
    for got, want in zip(plain, unmerged, strict=True):
        assert max_rel_err(got, want) < TOL
