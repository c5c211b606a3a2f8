"""nuggets_jax: Nuggets one-shot instruction-data selection in JAX/Flax."""

__version__ = "0.1.0"
