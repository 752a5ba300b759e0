"""infinito_jax: a JAX/Flax reimplementation of the INFINITO V5.2 language model."""

__version__ = "0.1.0"
