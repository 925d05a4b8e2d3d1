"""A perceptual loss: the weighted distance between a VGG's activations of two images
(docs/pretrained.md). Gradients flow to both images; the VGG's weights are constants."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vgg_jax import models

DISTANCES = ("l2", "l1")


def perceptual_loss(
    x: jax.Array,
    y: jax.Array,
    model: models.VGG,
    variables: Mapping[str, Any],
    layers: Sequence[str] | None = None,
    layer_weights: Sequence[float] | None = None,
    distance: str = "l2",
    normalize_channels: bool = False,
    before_relu: bool = False,
) -> jax.Array:
    """sum over layers l of w_l * mean over (H, W, C) of d(f_l(x) - f_l(y)), averaged over
    the batch: a scalar.

    x, y: images as the model takes them (RGB, 0..255, NHWC; float for gradients).
    layers: feature names (`VGG.features`); None: the last convolution of every block.
    layer_weights: one per layer; None: 1 each.
    distance: 'l2' (squared difference, as in Johnson et al. 2016) or 'l1'.
    normalize_channels: scale each position's feature vector to unit length first, as
      LPIPS does, so that layers of different magnitudes count alike.
    before_relu: compare the convolutions' outputs before their ReLU.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    # One pass over both batches: half the dispatches, the same activations.
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)  # uint8 -> float32
    both = jnp.concatenate([jnp.asarray(x, dtype), jnp.asarray(y, dtype)])
    features = model.apply(
        variables, both, layers=layers, before_relu=before_relu, method="features"
    )
    names = list(features) if layers is None else list(dict.fromkeys(layers))
    weights = [1.0] * len(names) if layer_weights is None else list(layer_weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} layer_weights for {len(names)} layers")
    total = jnp.zeros((), dtype)
    for name, weight in zip(names, weights, strict=True):
        fx, fy = jnp.split(features[name], 2)
        if normalize_channels:
            fx, fy = _unit_channels(fx), _unit_channels(fy)
        difference = fx - fy
        per_element = difference**2 if distance == "l2" else jnp.abs(difference)
        total = total + weight * jnp.mean(per_element)
    return total


def _unit_channels(features: jax.Array, eps: float = 1e-10) -> jax.Array:
    # eps inside the root: an all-zero vector (common after a ReLU) gets a zero
    # gradient, not the NaN of sqrt's derivative at 0.
    norm = jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True) + eps**2)
    return features / norm
