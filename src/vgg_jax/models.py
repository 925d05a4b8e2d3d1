"""VGG (Simonyan & Zisserman 2014) as one configurable Flax linen module.

The module takes uint8 (or float 0..255) NHWC images and normalises them itself, so a
checkpoint plus its config is everything a predictor needs. Its layers are stock Flax
(`nn.Conv`, `nn.Dropout`, `nn.max_pool`) unless others are passed in: `build_model`
passes the CPU kernels of `vgg_jax.cpu` where the backend is a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vgg_jax import spec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# PyTorch's default initialisation for conv and dense kernels (kaiming_uniform with
# a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Under BN a smaller initial scale means a
# larger effective step early on, which the reference recipe's heavily dropped-out net
# needs to get going; it also makes our nets and the PyTorch twin identical at init.
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 (an odd last row or column is dropped)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG(nn.Module):
    """A VGG network: blocks of 3x3 convolutions and 2x2 max-pools, then a dense head.

    Attributes:
      stages: channels of each convolution, one tuple per block.
      num_classes: size of the output layer.
      batch_norm: BN after every convolution (and in the head where it asks for BN).
      conv_dropout: dropout rate after each convolution, same shape as `stages`.
      head: a key of `spec.HEADS`.
      head_dropout: dropout rate in the head (overrides the head's default if set).
      dtype: compute dtype; parameters and BN statistics stay float32.
      mean, std: per-channel input statistics in 0..255 units.
      conv, dropout, max_pool: the layers to build with (drop-in replacements allowed).
    """

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

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
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
                x = nn.relu(x)
                rate = self.conv_dropout[block_index][conv_index] if self.conv_dropout else 0.0
                if rate > 0:
                    x = self.dropout(rate, deterministic=not train)(x)
            x = self.max_pool(x)
        return self._head(x.reshape((x.shape[0], -1)), train)

    def _head(self, x: jax.Array, train: bool) -> jax.Array:
        head = spec.HEADS[self.head]
        rate = head["dropout"] if self.head_dropout is None else self.head_dropout
        for index, features in enumerate(head["hidden"]):
            if head["dropout_first"]:
                x = self.dropout(rate, deterministic=not train)(x)
            x = self._dense(features, f"fc{index + 1}")(x)
            if head["batch_norm"] and self.batch_norm:
                x = self._batch_norm(f"fc_bn{index + 1}", train)(x)
            x = nn.relu(x)
            x = self.dropout(rate, deterministic=not train)(x)
        for index, features in enumerate(head["linear"], start=len(head["hidden"]) + 1):
            x = self._dense(features, f"fc{index}")(x)
        x = self._dense(self.num_classes, "classifier")(x)
        return x.astype(jnp.float32)

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
    """The VGG that `config` describes for a dataset (`data_sources.DatasetInfo`: its
    class names and normalisation), with the CPU kernels where they apply."""
    from vgg_jax import cpu  # the one place the CPU speed work is injected

    return create_model(
        config.model,
        len(info.class_names),
        width=config.width,
        batch_norm=config.batch_norm,
        conv_dropout=config.conv_dropout,
        head=config.head,
        head_dropout=config.head_dropout,
        dtype=DTYPES[config.dtype],
        mean=info.mean,
        std=info.std,
        stages=config.stages,
        **cpu.layers_for(config.conv_impl),
    )


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
