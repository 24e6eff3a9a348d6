"""VQA end to end on generated data (bf16 compute): train a few steps, evaluate by ranking and by generation."""

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.train.config import base_config
from aurora_jax.train.loop import train
from aurora_jax.train.recipes import blip


def test_vqa_trains_and_evaluates_both_ways(tmp_path):
    c = base_config()
    c.task = "vqa"
    c.compute_dtype = "bfloat16"
    c.model.size = "tiny"
    c.model.image_size = 16
    c.peft.rank = 4
    c.data.name = "shapes"
    c.data.num_train = 16
    c.data.num_test = 4
    c.data.max_len = 12
    c.optim.batch_size = 8
    c.optim.epochs = 1
    c.eval.at_start = False
    c.eval.k_test = 4
    c.eval.batch_size = 8
    c.max_steps = 3
    results = train(c, str(tmp_path / "vqa"), progress=False)
    assert results["steps"] == 3
    after = results["after"]
    assert after["num_questions"] > 0 and 0.0 <= after["vqa_acc"] <= 100.0
    run = results["run"]
    generated = blip.evaluate_vqa(run.model, run.cfg, run.peft_cfg, run.state.trainable, run.frozen,
                                      run.data, k=4, mode="generate")
    assert generated["num_questions"] == after["num_questions"]
    assert np.isfinite(generated["vqa_acc"])
    # Only what trains is in the optimizer: the adapter of the encoder and of the answer decoder.
    assert set(run.state.trainable["adapter"]["factors"]) == {"text_encoder", "text_decoder", "visual_encoder"}
    # bf16 compute: frozen weights stored in bf16, what trains (and the optimizer) in float32
    leaves = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
    assert {x.dtype for x in leaves(run.frozen) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in leaves(run.state.trainable)} == {jnp.dtype("float32")}
    assert np.isfinite(float(results["after"]["vqa_acc"]))
