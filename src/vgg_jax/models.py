"""VGG (Simonyan & Zisserman 2014) as one configurable Flax linen module. It normalises
its uint8 (or float 0..255) NHWC images itself, so a checkpoint plus its config is all a
predictor needs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgg_jax import cpu, spec

# PyTorch's default initialisation for conv and dense kernels (kaiming_uniform with
# a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Under BN a smaller initial scale means a
# larger effective step early on, which the reference recipe's heavily dropped-out net
# needs to get going; it also makes our nets and the PyTorch twin identical at init.
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 (an odd last row or column is dropped)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _bin_matrix(size: int, bins: int) -> np.ndarray:
    """(bins, size) weights of torchvision's adaptive average pooling along one axis."""
    matrix = np.zeros((bins, size), np.float32)
    for i in range(bins):
        start, end = (i * size) // bins, -(-((i + 1) * size) // bins)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torchvision's AdaptiveAvgPool2d((size, size)) on an NHWC map: neighbouring bins
    overlap where the map's side is not a multiple of `size`, and a map smaller than
    `size` is spread over several bins. The identity on a size x size map."""
    _, height, width, _ = x.shape
    if (height, width) == (size, size):
        return x
    rows = jnp.asarray(_bin_matrix(height, size), x.dtype)
    cols = jnp.asarray(_bin_matrix(width, size), x.dtype)
    # HIGHEST: no reduced-precision (TF32) matmul passes on GPUs for this small average.
    return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x, precision=jax.lax.Precision.HIGHEST)


class VGG(nn.Module):
    """Blocks of 3x3 convolutions (channels: `stages`) and 2x2 max-pools, then a head of
    `spec.HEADS`. `apply(variables, images)` gives logits, `apply(variables, images,
    layers=(...), method="features")` named activations. `conv_dropout`: a rate per
    convolution; `batch_norm`: BN after every convolution (and in the head where the head
    asks for it); `head_dropout` overrides the head's own rate; `dtype`: the compute dtype
    (parameters and BN statistics stay float32); `mean`, `std`: per channel, 0..255 units;
    `conv`, `dropout`, `max_pool`: the layers (stock Flax unless replaced: `vgg_jax.cpu`)."""

    stages: Sequence[Sequence[int]]
    num_classes: int
    batch_norm: bool = True
    conv_dropout: Sequence[Sequence[float]] | None = None
    head: str = "cifar"
    head_dropout: float | None = None
    dtype: Any = jnp.float32
    mean: Sequence[float] = spec.IMAGENET_MEAN
    std: Sequence[float] = spec.IMAGENET_STD
    conv: Any = nn.Conv
    dropout: Any = nn.Dropout
    max_pool: Callable[[jax.Array], jax.Array] = max_pool_2x2

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Logits (float32) for uint8 or float 0..255 NHWC images."""
        return self._forward(images, train, None, False)

    def features(
        self,
        images: jax.Array,
        layers: Sequence[str] | None = None,
        before_relu: bool = False,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        """Named activations of the convolutional part, for perceptual losses
        (docs/pretrained.md). `layers`: names from `spec.feature_layer_names`; None: the
        last convolution of every block. 'convB_I' is that convolution's ReLU output, or
        with `before_relu` the ReLU's input. Nothing past the deepest layer asked for is
        computed and the head is never touched, so convolutions-only variables will do."""
        known = spec.feature_layer_names(self.stages)
        layers = spec.block_outputs(self.stages) if layers is None else tuple(layers)
        unknown = [name for name in layers if name not in known]
        if unknown or not layers:
            raise ValueError(
                f"unknown feature layers {unknown or list(layers)}; this model has {list(known)}"
            )
        if before_relu and any(name.startswith("pool") for name in layers):
            raise ValueError("before_relu applies to convolutions, not to pool layers")
        return self._forward(images, train, layers, before_relu)

    @nn.compact
    def _forward(
        self,
        images: jax.Array,
        train: bool,
        feature_layers: tuple[str, ...] | None,
        before_relu: bool,
    ) -> Any:
        # One forward pass for both entry points: the logits, or (feature_layers given)
        # the named activations, stopping after the deepest one.
        wanted = set(feature_layers or ())
        found: dict[str, jax.Array] = {}
        # Inputs, outputs and features in float32 (float64 for a float64 model).
        out = jnp.promote_types(self.dtype, jnp.float32)
        x = (images.astype(out) - jnp.asarray(self.mean, out)) / jnp.asarray(self.std, out)
        x = x.astype(self.dtype)
        for block_index, block in enumerate(self.stages):
            for conv_index, channels in enumerate(block):
                name = f"{block_index + 1}_{conv_index + 1}"
                x = self.conv(
                    channels,
                    (3, 3),
                    padding="SAME",
                    use_bias=not self.batch_norm,
                    dtype=self.dtype,
                    kernel_init=TORCH_KERNEL_INIT,
                    name=f"conv{name}",
                )(x)
                if self.batch_norm:
                    x = self._batch_norm(f"bn{name}", train)(x)
                pre_relu, x = x, nn.relu(x)
                if f"conv{name}" in wanted:
                    found[f"conv{name}"] = (pre_relu if before_relu else x).astype(out)
                    if len(found) == len(wanted):
                        return found
                rate = self.conv_dropout[block_index][conv_index] if self.conv_dropout else 0.0
                if rate > 0:
                    x = self.dropout(rate, deterministic=not train)(x)
            x = self.max_pool(x)
            if f"pool{block_index + 1}" in wanted:
                found[f"pool{block_index + 1}"] = x.astype(out)
                if len(found) == len(wanted):
                    return found
        return self._head(x, train)

    def _head(self, x: jax.Array, train: bool) -> jax.Array:
        head = spec.HEADS[self.head]
        if "pool" in head:
            x = adaptive_avg_pool(x, head["pool"])
        x = x.reshape((x.shape[0], -1))
        rate = head["dropout"] if self.head_dropout is None else self.head_dropout
        if head["dropout_first"]:
            x = self.dropout(rate, deterministic=not train)(x)
        for index, features in enumerate(head["hidden"]):
            x = self._dense(features, f"fc{index + 1}")(x)
            if head["batch_norm"] and self.batch_norm:
                x = self._batch_norm(f"fc_bn{index + 1}", train)(x)
            x = nn.relu(x)
            x = self.dropout(rate, deterministic=not train)(x)
        for index, features in enumerate(head["linear"], start=len(head["hidden"]) + 1):
            x = self._dense(features, f"fc{index}")(x)
        x = self._dense(self.num_classes, "classifier")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))

    def _batch_norm(self, name: str, train: bool) -> nn.BatchNorm:
        # momentum 0.9 / eps 1e-5: Paddle's and PyTorch's defaults (0.1 there means 0.9 here).
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=name
        )

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, kernel_init=TORCH_KERNEL_INIT, name=name)


def create_model(
    name: str,
    num_classes: int,
    *,
    width: float = 1.0,
    batch_norm: bool = True,
    conv_dropout: str = "none",
    head: str = "cifar",
    head_dropout: float | None = None,
    dtype: Any = jnp.float32,
    mean: Sequence[float] = spec.IMAGENET_MEAN,
    std: Sequence[float] = spec.IMAGENET_STD,
    stages: Sequence[Sequence[int]] | None = None,
    **layers: Any,
) -> VGG:
    """A VGG from a preset name ('vgg11' .. 'vgg19', 'vgg_tiny') or explicit stages;
    `layers` may replace `conv`, `dropout` and `max_pool`."""
    if stages is None:
        if name not in spec.STAGES:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(spec.STAGES)}")
        stages = spec.STAGES[name]
    if head not in spec.HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(spec.HEADS)}")
    stages = spec.scaled_stages(stages, width)
    return VGG(
        stages=stages,
        num_classes=num_classes,
        batch_norm=batch_norm,
        conv_dropout=spec.conv_dropout_rates(stages, conv_dropout),
        head=head,
        head_dropout=head_dropout,
        dtype=dtype,
        mean=tuple(mean),
        std=tuple(std),
        **layers,
    )


def build_model(config: ml_collections.ConfigDict, info: Any) -> VGG:
    """The VGG that `config` describes for a dataset (`data.DatasetInfo`: its
    class names and normalisation), with the backend's layers (`backend_tuning`)."""
    return create_model(
        config.model,
        len(info.class_names),
        width=config.width,
        batch_norm=config.batch_norm,
        conv_dropout=config.conv_dropout,
        head=config.head,
        head_dropout=config.head_dropout,
        dtype=jnp.dtype(config.dtype),
        mean=info.mean,
        std=info.std,
        stages=config.stages,
        **backend_tuning(config).layers,
    )


def backend_tuning(config: ml_collections.ConfigDict) -> cpu.Tuning:
    """The backend's speed work for a run of `config` (`cpu.Tuning`): the one place it
    is injected."""
    return cpu.tuning(config.conv_impl)


def _preset(name: str, batch_norm: bool):
    def build(num_classes: int = 1000, **kwargs: Any) -> VGG:
        kwargs.setdefault("head", "imagenet")
        return create_model(name, num_classes, batch_norm=batch_norm, **kwargs)

    build.__name__ = name + ("_bn" if batch_norm else "")
    build.__doc__ = f"{name.upper()} {'with' if batch_norm else 'without'} batch norm."
    return build


vgg11 = _preset("vgg11", False)
vgg11_bn = _preset("vgg11", True)
vgg13 = _preset("vgg13", False)
vgg13_bn = _preset("vgg13", True)
vgg16 = _preset("vgg16", False)
vgg16_bn = _preset("vgg16", True)
vgg19 = _preset("vgg19", False)
vgg19_bn = _preset("vgg19", True)
