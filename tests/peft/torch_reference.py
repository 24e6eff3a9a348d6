"""The parity tests' PyTorch reference of Aurora: it lives in bench/torch_aurora.py, the one torch implementation
of the method that the benchmarks use too (independent of aurora_jax.peft; only weights are shared)."""

from bench.torch_aurora import (  # noqa: F401
    DT,
    RefAurora,
    attention,
    from_jax_adapter,
    lin,
    ln,
    ref_bert,
    ref_lm_head,
    ref_vit,
    t,
)
