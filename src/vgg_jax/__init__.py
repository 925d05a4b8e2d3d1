"""vgg-jax: train VGG networks in JAX + Flax.

import vgg_jax
model = vgg_jax.load("/tmp/vgg16")      # a training workdir
model.predict(["dog.png"])              # class probabilities
"""

from vgg_jax.inference import Predictor, load
from vgg_jax.models import VGG, create_model

__version__ = "0.1.0"
__all__ = ["VGG", "Predictor", "create_model", "load", "__version__"]
