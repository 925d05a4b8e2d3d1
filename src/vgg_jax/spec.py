"""The facts that define a VGG network, in plain Python: read by the Flax model, the
PyTorch twin, the FLOP count, the config check and the checkpoint loader alike."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

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


def _head(hidden: tuple[int, ...], **options: Any) -> dict:
    """A classifier head: dense layers of widths `hidden`, each followed by BN (where
    `batch_norm`), ReLU and dropout (rate `dropout`); then plain dense layers `linear` (no
    activation) and the classifier. `dropout_first`: dropout on the flattened features
    first; `pool`: the side the last feature map is average-pooled to first."""
    defaults = {"batch_norm": False, "dropout": 0.5, "dropout_first": False, "linear": ()}
    return {**defaults, **options, "hidden": hidden}


HEADS: dict[str, dict] = {
    # The PaddlePaddle reference: dropout -> fc512 -> BN+ReLU+dropout -> fc512 -> fc(classes).
    "cifar": _head((512,), batch_norm=True, dropout_first=True, linear=(512,)),
    # The paper's ImageNet head: fc4096-ReLU-dropout x2 -> fc(classes).
    "imagenet": _head((4096, 4096)),
    # Only the classifier on the flattened features (512 numbers for VGG at 32x32): the
    # usual CIFAR VGG of PyTorch tutorials; dropout (off by default) on its input.
    "linear": _head((), dropout=0.0, dropout_first=True),
    # torchvision's VGG head: AdaptiveAvgPool2d((7, 7)) on the last feature map (so any
    # input size feeds fc1 a 7x7 map, as in torchvision), then the ImageNet head. At 224
    # pixels the pool is the identity and the parameters are the 'imagenet' head's.
    "torchvision": _head((4096, 4096), pool=7),
    # The TensorFlow reference benchmark: fc2048-ReLU-dropout x2 -> fc(classes), no BN.
    "tf_benchmark": _head((2048, 2048)),
}

# Per-convolution dropout patterns by name. 'paddle': the PaddlePaddle reference's 0.3
# after the first block's convolutions and 0.4 after the others', none after a block's
# last convolution (the pool follows it).
CONV_DROPOUT_PATTERNS = ("paddle", "none")

# Spellings that earlier versions used, and what they are called now.
RENAMED = {"conv_dropout": {"seed": "paddle"}, "head": {"tf_seed": "tf_benchmark"}}

# ImageNet statistics in 0..255 units: the normalisation when a dataset gives none, and
# torchvision's (its mean/std on 0..1 RGB, times 255).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Keras' "caffe" preprocessing (VGG16/VGG19): BGR, minus these means, no scaling. Here in
# RGB order; the BGR swap is folded into the first convolution on import.
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
CAFFE_STD = (1.0, 1.0, 1.0)

# Published ImageNet weights this package imports by name: source name -> (model, BN).
PRETRAINED = {
    **{
        f"torchvision:{model}{'_bn' if bn else ''}": (model, bn)
        for model in ("vgg11", "vgg13", "vgg16", "vgg19")
        for bn in (False, True)
    },
    # The 'notop' files hold the convolutions only: for features and fine-tuning.
    **{
        f"keras:{model}{top}": (model, False)
        for model in ("vgg16", "vgg19")
        for top in ("", "_notop")
    },
}


def scaled_stages(stages: Sequence[Sequence[int]], width: float) -> tuple[tuple[int, ...], ...]:
    """Multiplies every block's channel count by `width` (at least one channel)."""
    return tuple(tuple(max(1, round(c * width)) for c in block) for block in stages)


def conv_dropout_rates(stages: Sequence[Sequence[int]], spec: str) -> tuple[tuple[float, ...], ...]:
    """Per-convolution dropout rates: 'paddle', 'none', or one rate such as '0.2' after
    every convolution but a block's last."""
    if spec == "paddle":
        first_rates = [0.3] + [0.4] * (len(stages) - 1)
    else:
        rate = 0.0 if spec == "none" else parse_rate(spec)
        if rate is None:
            raise ValueError(
                f"conv_dropout must be 'paddle', 'none' or a rate in [0, 1), got {spec!r}"
            )
        first_rates = [rate] * len(stages)
    return tuple(
        tuple(rate if i < len(block) - 1 else 0.0 for i in range(len(block)))
        for rate, block in zip(first_rates, stages, strict=True)
    )


def parse_rate(text: str) -> float | None:
    """A dropout rate written as text, or None if it is not a number in [0, 1)."""
    try:
        rate = float(text)
    except ValueError:
        return None
    return rate if 0.0 <= rate < 1.0 else None


def dense_widths(head: str, num_classes: int) -> tuple[int, ...]:
    """Output widths of the head's dense layers in order, the classifier last."""
    spec = HEADS[head]
    return (*spec["hidden"], *spec["linear"], num_classes)


def head_input_side(head: str, side: int) -> int:
    """Height (= width) of the feature map the head flattens, for a last map of `side`."""
    return HEADS[head].get("pool", side)


def block_of(layer: str) -> int | None:
    """The block number of a feature layer ('conv3_2', 'bn3_2', 'pool3' -> 3); None for
    the head's layers."""
    match = re.match(r"(?:conv|bn|pool)(\d+)(?:_|$)", layer)
    return int(match[1]) if match else None


def feature_layer_names(stages: Sequence[Sequence[int]]) -> tuple[str, ...]:
    """The named activations of the convolutional part, in order: conv{block}_{i} (after
    its BN and ReLU) and pool{block}."""
    names = []
    for block_index, block in enumerate(stages, start=1):
        names += [f"conv{block_index}_{i}" for i in range(1, len(block) + 1)]
        names.append(f"pool{block_index}")
    return tuple(names)


def block_outputs(stages: Sequence[Sequence[int]]) -> tuple[str, ...]:
    """The last convolution of every block: for VGG16 conv1_2, conv2_2, conv3_3, conv4_3,
    conv5_3, the usual perceptual-loss layers."""
    return tuple(f"conv{b}_{len(block)}" for b, block in enumerate(stages, start=1))
