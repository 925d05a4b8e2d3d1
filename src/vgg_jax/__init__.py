"""vgg-jax: train VGG networks in JAX + Flax."""

from vgg_jax.models import VGG, create_model

__version__ = "0.1.0"
__all__ = ["VGG", "create_model", "__version__"]
