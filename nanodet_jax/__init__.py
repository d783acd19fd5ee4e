"""nanodet_jax: NanoDet-Plus in JAX/Flax Linen, numerically faithful to the PyTorch reference."""

__version__ = "0.1.0"
