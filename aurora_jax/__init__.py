"""aurora-jax: parameter-efficient tuning of multimodal foundation models in JAX."""

__version__ = "0.1.0"
