"""Side-by-side benchmarks of aurora_jax against the PyTorch references (see bench/README.md)."""
