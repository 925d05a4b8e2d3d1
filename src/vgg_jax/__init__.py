"""vgg-jax: train VGG networks in JAX + Flax.

import vgg_jax
model = vgg_jax.load("/tmp/vgg16")      # a training workdir
model.predict(["dog.png"])              # class probabilities

model, variables = vgg_jax.pretrained.load("torchvision:vgg16_bn")   # ImageNet weights
loss = vgg_jax.perceptual_loss(x, y, model, variables)
distance = vgg_jax.lpips.LPIPS("torchvision:vgg16")(x, y)            # x, y in [-1, 1]
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
# Imported on first use, so that `python -m vgg_jax.main` can check its config before
# JAX is loaded.
_LAZY = {
    "load": "vgg_jax.inference",
    "Predictor": "vgg_jax.inference",
    "VGG": "vgg_jax.models",
    "create_model": "vgg_jax.models",
    "perceptual_loss": "vgg_jax.perceptual",
}
_SUBMODULES = ("lpips", "pretrained")
__all__ = [*_LAZY, *_SUBMODULES, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"vgg_jax.{name}")
    raise AttributeError(f"module 'vgg_jax' has no attribute {name!r}")
