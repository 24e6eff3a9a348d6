"""Parameter-efficient tuning as a transform over a frozen base model (the base knows nothing of it).

Methods (`PeftConfig.method`): "aurora" (mode approximation + Gated Query Transformation), "lora",
"full" fine-tuning and "frozen". Typical use::

    adapter = init_adapter(base_params, cfg, rng)
    trainable, frozen = partition(base_params, adapter, cfg)
    def loss(trainable):
        base, adapter = combine(trainable, frozen)
        return task_loss(tuned_apply(model, base, adapter, cfg, *batch, method=Blip.itm))
    grads = jax.grad(loss)(trainable)
"""

from aurora_jax.peft.adapter import init_adapter
from aurora_jax.peft.config import METHODS, PeftConfig
from aurora_jax.peft.gqt import gated_query_transform, init_gqt
from aurora_jax.peft.hooks import DROPOUT_RNG, TunedDecoder, adapter_interceptor, tuned_apply, tuned_forward
from aurora_jax.peft.ice import informative_context
from aurora_jax.peft.lora import init_lora, lora_delta
from aurora_jax.peft.merge import lora_weight_deltas, merge, mode_approx_weight_deltas
from aurora_jax.peft.mode_approx import (
    core_mode_product,
    init_mode_approx,
    mode_approx_delta,
    mode_approx_delta_text,
    mode_approx_fc1_delta,
    mode_approx_fc2_delta,
    site_delta,
)
from aurora_jax.peft.partition import (
    base_trainable,
    combine,
    count_params,
    partition,
    print_trainable_parameters,
    trainable_summary,
)
from aurora_jax.peft.sites import LLM_LINEARS, aurora_sites, gqt_layers, lora_sites

__all__ = [
    "DROPOUT_RNG", "LLM_LINEARS", "METHODS", "PeftConfig", "TunedDecoder", "adapter_interceptor",
    "aurora_sites", "base_trainable", "combine", "core_mode_product", "count_params", "gated_query_transform",
    "gqt_layers",
    "informative_context", "init_adapter", "init_gqt", "init_lora", "init_mode_approx", "lora_delta",
    "lora_sites", "lora_weight_deltas", "merge", "mode_approx_delta", "mode_approx_delta_text",
    "mode_approx_fc1_delta", "mode_approx_fc2_delta", "mode_approx_weight_deltas", "partition",
    "print_trainable_parameters", "site_delta", "trainable_summary", "tuned_apply", "tuned_forward",
]
