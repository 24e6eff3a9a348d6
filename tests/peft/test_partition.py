"""Only the trainable tree (adapter + chosen heads) is differentiated; the base tree never is."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.models.blip import Blip
from aurora_jax.peft import PeftConfig, combine, count_params, init_adapter, partition, tuned_apply
from tests.fixtures import TINY_RETRIEVAL, blip_inputs, trained_adapter

MODEL = Blip(TINY_RETRIEVAL)
# Shapes that only a gradient w.r.t. a frozen Dense kernel of the tiny model produces (the forward pass
# makes (batch, tokens, features) activations): ViT qkv/fc1/fc2, BERT FFN intermediate/output.
FROZEN_KERNEL_SHAPES = {(32, 96), (32, 128), (128, 32), (32, 64), (64, 32)}


def _loss_fn(frozen, cfg):
    pixels, ids, mask = blip_inputs()

    def loss(trainable, frozen=frozen):
        base, adapter = combine(trainable, frozen)
        run = lambda method: tuned_apply(MODEL, base, adapter, cfg, pixels, ids, mask, method=method)  # noqa: E731
        return jnp.sum(run(Blip.itm) ** 2) + jnp.sum(run(Blip.itc) ** 2)

    return loss


def _eqn_shapes(jaxpr) -> set:
    """Shapes of every value computed in a jaxpr, sub-jaxprs (pjit, remat, custom_vjp...) included.

    stop_gradient (combine() wraps each frozen leaf in one) is the identity and computes nothing.
    """
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "stop_gradient":
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    shapes |= _eqn_shapes(sub)
    return shapes


def test_gradients_reach_only_trainable_leaves(retrieval_params, retrieval_adapter, aurora_cfg):
    trainable, frozen = partition(retrieval_params, retrieval_adapter, aurora_cfg)
    assert set(trainable["base"]) == {"vision_proj", "itm_head"}  # text_proj frozen, as in the release
    assert "vision_proj" not in frozen and "text_proj" in frozen and "temp" in frozen
    loss = _loss_fn(frozen, aurora_cfg)
    grads, frozen_grads = jax.jit(lambda t, f: (jax.grad(loss)(t, f), jax.grad(loss, argnums=1)(t, f)))(
        trainable, frozen)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
    # combine() stop-gradients the frozen tree: even asked for, its gradient is exactly zero
    assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(frozen_grads))


def test_jaxpr_never_differentiates_the_base(retrieval_params, retrieval_adapter, aurora_cfg):
    trainable, frozen = partition(retrieval_params, retrieval_adapter, aurora_cfg)
    loss = _loss_fn(frozen, aurora_cfg)
    grad_jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable)
    assert [tuple(v.aval.shape) for v in grad_jaxpr.jaxpr.outvars] == [
        tuple(x.shape) for x in jax.tree_util.tree_leaves(trainable)]
    assert not _eqn_shapes(grad_jaxpr.jaxpr) & FROZEN_KERNEL_SHAPES
    # control: differentiating the whole base tree does produce those kernel-shaped cotangents
    everything = {"adapter": retrieval_adapter, "base": retrieval_params}
    control = jax.make_jaxpr(jax.grad(_loss_fn({}, aurora_cfg)))(everything)
    assert FROZEN_KERNEL_SHAPES <= _eqn_shapes(control.jaxpr)


def test_text_proj_switch(retrieval_params, retrieval_adapter, aurora_cfg):
    cfg = aurora_cfg.replace(train_heads=("vision_proj", "itm_head", "text_proj"))
    trainable, frozen = partition(retrieval_params, retrieval_adapter, cfg)
    assert set(trainable["base"]) == {"vision_proj", "itm_head", "text_proj"} and "text_proj" not in frozen
    grads = jax.eval_shape(jax.grad(_loss_fn(frozen, cfg)), trainable)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)


def test_frozen_full_and_lora_partitions(retrieval_params):
    params = retrieval_params
    n_base = count_params(params)
    heads = count_params(params["vision_proj"]) + count_params(params["itm_head"])
    for method, adapter_keys, n_train in (("frozen", set(), heads), ("full", set(), n_base - 1),
                                          ("lora", {"lora"}, None)):
        cfg = PeftConfig(method=method, lora_r=2)
        adapter = trained_adapter(init_adapter(params, cfg, jax.random.key(0)))
        assert set(adapter) == adapter_keys
        trainable, frozen = partition(params, adapter, cfg)
        assert count_params(trainable) + count_params(frozen) == n_base + count_params(adapter)
        if n_train is not None:
            assert count_params(trainable) == n_train
        if method == "full":
            assert set(frozen) == {"temp"}  # the ITC temperature stays at its checkpoint value
        base, back = combine(trainable, frozen)
        assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(params)
        grads = jax.eval_shape(jax.grad(_loss_fn(frozen, cfg)), trainable)
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    # the frozen baseline is the base model, bit for bit (no interceptor is even installed)
    pixels, ids, mask = blip_inputs()
    np.testing.assert_array_equal(
        tuned_apply(MODEL, params, {}, PeftConfig(method="frozen"), pixels, ids, mask, method=Blip.itm),
        MODEL.apply({"params": params}, pixels, ids, mask, method=Blip.itm))
