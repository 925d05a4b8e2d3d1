"""VGG (Simonyan & Zisserman 2014) as one configurable Flax linen module.

The module takes uint8 (or float 0..255) NHWC images and normalises them itself,
so a checkpoint plus its config is everything a predictor needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Channels of each convolution, grouped into the blocks that end in a 2x2 max-pool.
# A/B/D/E are the paper's Table 1 columns.
STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
    # A three-block toy for smoke runs and tests.
    "vgg_tiny": ((16,), (32,), (64,)),
}

# The classifier heads: hidden widths, whether the hidden layers use BN, dropout rate.
HEADS: dict[str, dict[str, Any]] = {
    # The Paddle seed: dropout -> fc512 -> BN+ReLU+dropout -> fc512 -> fc(classes).
    "cifar": {"hidden": (512,), "batch_norm": True, "dropout": 0.5},
    # The paper's ImageNet head: fc4096-ReLU-dropout x2 -> fc(classes).
    "imagenet": {"hidden": (4096, 4096), "batch_norm": False, "dropout": 0.5},
    # The TensorFlow seed: fc2048-ReLU-dropout x2 -> fc(classes), no BN.
    "tf_seed": {"hidden": (2048, 2048), "batch_norm": False, "dropout": 0.5},
}

# PyTorch's default initialisation for conv and dense kernels (kaiming_uniform with
# a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Under BN a smaller initial scale means a
# larger effective step early on, which the seed's heavily dropped-out net needs to get
# going; it also makes our nets and the PyTorch reference identical at initialisation.
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")

# ImageNet-style defaults: used when the caller gives no dataset statistics.
DEFAULT_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
DEFAULT_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def scaled_stages(stages: Sequence[Sequence[int]], width: float) -> tuple[tuple[int, ...], ...]:
    """Multiplies every block's channel count by `width` (at least one channel)."""
    return tuple(tuple(max(1, round(c * width)) for c in block) for block in stages)


def conv_dropout_rates(stages: Sequence[Sequence[int]], spec: str) -> tuple[tuple[float, ...], ...]:
    """Per-convolution dropout rates from a short spec.

    'seed': the Paddle seed's pattern generalised to any stack: 0.3 after the first
      block's convolutions, 0.4 after the others', none after a block's last
      convolution (it is followed by the pool). For VGG16 this is exactly
      [0.3,0] [0.4,0] [0.4,0.4,0] [0.4,0.4,0] [0.4,0.4,0].
    'none': no dropout in the convolutional part.
    a number such as '0.2': that rate after every convolution but a block's last.
    """
    if spec == "none":
        return tuple(tuple(0.0 for _ in block) for block in stages)
    if spec == "seed":
        first_rates = [0.3] + [0.4] * (len(stages) - 1)
    else:
        try:
            rate = float(spec)
        except ValueError:
            raise ValueError(
                f"conv_dropout must be 'seed', 'none' or a number, got {spec!r}"
            ) from None
        first_rates = [rate] * len(stages)
    return tuple(
        tuple(rate if i < len(block) - 1 else 0.0 for i in range(len(block)))
        for rate, block in zip(first_rates, stages, strict=True)
    )


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pool with stride 2 (VALID: an odd last row or column is dropped), as
    nn.max_pool(x, (2, 2), strides=(2, 2)) but written as a reshape and a max.

    Why: XLA:CPU differentiates reduce_window max into select_and_scatter, which took
    0.41 s per VGG16-CIFAR train step at batch 128 against 0.14 s for this form. Where
    the maximum is tied, the gradient is shared among the tied inputs instead of going to
    the first; after a ReLU such ties are zeros, whose gradient the ReLU zeroes anyway.
    """
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Dropout(nn.Module):
    """nn.Dropout drawing one random byte per element instead of 32 bits.

    The rate is rounded to a multiple of 1/256 (0.3 -> 77/256 = 0.3008, 0.4 -> 0.3984,
    0.5 exactly) and the kept values are scaled by 1 / (1 - that rate), so the
    expectation is exact. Why: threefry costs the same per 32-bit word whatever the
    requested width, so packing four bytes per word makes the masks 4x cheaper; on the
    2-core CPU they cost ~60 ms per 8.4M-element mask (VGG16-CIFAR's first block at
    batch 128), about 10% of a train step across the network.
    """

    rate: float
    deterministic: bool = False
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        threshold = round(self.rate * 256)
        if self.deterministic or threshold == 0:
            return x
        if threshold >= 256:
            return jnp.zeros_like(x)
        words = jax.random.bits(self.make_rng(self.rng_collection), (-(-x.size // 4),))
        noise = lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[: x.size]
        keep = noise.reshape(x.shape) >= threshold
        scale = jnp.asarray(256 / (256 - threshold), x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros_like(x))


class VGG(nn.Module):
    """A VGG network: blocks of 3x3 convolutions and 2x2 max-pools, then a dense head.

    Attributes:
      stages: channels of each convolution, one tuple per block.
      num_classes: size of the output layer.
      batch_norm: BN after every convolution (and in the head where it asks for BN).
      conv_dropout: dropout rate after each convolution, same shape as `stages`.
      head: a key of HEADS.
      head_dropout: dropout rate in the head (overrides the head's default if set).
      dtype: compute dtype; parameters and BN statistics stay float32.
      mean, std: per-channel input statistics in 0..255 units.
    """

    stages: Sequence[Sequence[int]]
    num_classes: int
    batch_norm: bool = True
    conv_dropout: Sequence[Sequence[float]] | None = None
    head: str = "cifar"
    head_dropout: float | None = None
    dtype: Any = jnp.float32
    mean: Sequence[float] = DEFAULT_MEAN
    std: Sequence[float] = DEFAULT_STD
    conv: Any = nn.Conv  # a drop-in replacement for nn.Conv (see vgg_jax.conv)

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = (images.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
        x = x.astype(self.dtype)
        for block_index, block in enumerate(self.stages):
            for conv_index, channels in enumerate(block):
                x = self.conv(
                    channels,
                    (3, 3),
                    padding="SAME",
                    use_bias=not self.batch_norm,
                    dtype=self.dtype,
                    kernel_init=TORCH_KERNEL_INIT,
                    name=f"conv{block_index + 1}_{conv_index + 1}",
                )(x)
                if self.batch_norm:
                    x = self._batch_norm(f"bn{block_index + 1}_{conv_index + 1}", train)(x)
                x = nn.relu(x)
                rate = self.conv_dropout[block_index][conv_index] if self.conv_dropout else 0.0
                if rate > 0:
                    x = Dropout(rate, deterministic=not train)(x)
            x = max_pool_2x2(x)
        return self._head(x.reshape((x.shape[0], -1)), train)

    def _head(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        spec = HEADS[self.head]
        rate = spec["dropout"] if self.head_dropout is None else self.head_dropout
        use_bn = spec["batch_norm"] and self.batch_norm
        for index, features in enumerate(spec["hidden"]):
            if self.head == "cifar":
                # The seed drops the pooled features before its first dense layer.
                x = Dropout(rate, deterministic=not train)(x)
            x = self._dense(features, f"fc{index + 1}")(x)
            if use_bn:
                x = self._batch_norm(f"fc_bn{index + 1}", train)(x)
            x = nn.relu(x)
            x = Dropout(rate, deterministic=not train)(x)
        if self.head == "cifar":
            # The seed's second fc512 is linear and feeds the classifier directly.
            x = self._dense(512, f"fc{len(spec['hidden']) + 1}")(x)
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
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    stages: Sequence[Sequence[int]] | None = None,
    conv: Any = nn.Conv,
) -> VGG:
    """Builds a VGG from a preset name ('vgg11' .. 'vgg19', 'vgg_tiny') or explicit stages."""
    if stages is None:
        if name not in STAGES:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(STAGES)}")
        stages = STAGES[name]
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    stages = scaled_stages(stages, width)
    return VGG(
        stages=stages,
        num_classes=num_classes,
        batch_norm=batch_norm,
        conv_dropout=conv_dropout_rates(stages, conv_dropout),
        head=head,
        head_dropout=head_dropout,
        dtype=dtype,
        mean=tuple(mean),
        std=tuple(std),
        conv=conv,
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
