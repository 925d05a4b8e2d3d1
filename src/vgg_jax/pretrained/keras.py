"""Keras's VGG16 / VGG19 .h5 files (h5py, no TensorFlow), as our variables."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_jax import models, spec
from vgg_jax.pretrained.registry import WeightFormatError, check_arch

KERAS_HEAD = {"fc1": "fc1", "fc2": "fc2", "predictions": "classifier"}


def _keras_h5_layers(path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> [kernel, bias] from a Keras weight file: the legacy layout of the
    published files (`layer_names`, `weight_names` attributes; also inside a whole-model
    file's `model_weights`) or Keras 3's `.weights.h5` (layers/*/vars/0, 1)."""
    import h5py

    layers: dict[str, list[np.ndarray]] = {}
    with h5py.File(path, "r") as file:
        root = file.get("model_weights", file)
        if "layer_names" in root.attrs:
            for name in map(_text, root.attrs["layer_names"]):
                group = root[name]
                weight_names = [_text(w) for w in group.attrs.get("weight_names", [])]
                if weight_names:
                    layers[name] = [np.asarray(group[w]) for w in weight_names]
        elif "layers" in root:
            for key, group in root["layers"].items():
                values = group.get("vars")
                if values is None or not len(values):
                    continue
                name = _text(values.attrs.get("name", key))
                layers[name] = [np.asarray(values[str(i)]) for i in range(len(values))]
        else:
            raise WeightFormatError(f"{path}: not a Keras weight file (no layer_names)")
    return layers


def _text(value: bytes | str) -> str:
    """An HDF5 attribute's string: h5py gives bytes for the legacy files' names."""
    return value.decode() if isinstance(value, bytes) else str(value)


def from_keras(source: Any, arch: str | None = None) -> tuple[models.VGG, dict]:
    """Keras VGG16 / VGG19 weights (a .h5 file or a Keras model) -> (model, variables)
    with the 'imagenet' head, normalising as Keras' "caffe" mode; for the input size the
    Keras model was built for (it flattens the last map). A 'notop' file gives the
    convolutions only."""
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        layers, what = _keras_h5_layers(path), str(path)
    else:
        layers = {layer.name: layer.get_weights() for layer in source.layers}
        what = f"Keras model {getattr(source, 'name', '')}".strip()
    convs = {}
    for name, values in layers.items():
        match = re.fullmatch(r"block(\d+)_conv(\d+)", name)
        if match and values:
            convs[(int(match[1]), int(match[2]))] = values
    if not convs:
        raise WeightFormatError(f"{what} has no blockB_convI layers: not a Keras VGG")
    stages = []
    for block in range(1, max(b for b, _ in convs) + 1):
        count = max((i for b, i in convs if b == block), default=0)
        if count == 0 or any((block, i) not in convs for i in range(1, count + 1)):
            raise WeightFormatError(f"{what}: block{block}'s convolutions are incomplete")
        stages.append(tuple(int(convs[(block, i)][0].shape[-1]) for i in range(1, count + 1)))
    stages = tuple(stages)
    name = check_arch(arch, stages, False, what)
    params = {}
    for (block, index), (kernel, bias) in sorted(convs.items()):  # _check_keras_shapes' order
        if (block, index) == (1, 1):
            kernel = kernel[:, :, ::-1, :]  # Keras feeds BGR: swap the input channels
        params[f"conv{block}_{index}"] = {"kernel": kernel, "bias": bias}
    present = [keras_name for keras_name in KERAS_HEAD if layers.get(keras_name)]
    if present and len(present) != len(KERAS_HEAD):
        raise WeightFormatError(f"{what} has {present} of the head's {list(KERAS_HEAD)}")
    for keras_name in present:
        kernel, bias = layers[keras_name]
        params[KERAS_HEAD[keras_name]] = {"kernel": kernel, "bias": bias}
    _check_keras_shapes(params, what)
    num_classes = params["classifier"]["kernel"].shape[1] if present else 1000
    model = models.create_model(
        name,
        num_classes,
        batch_norm=False,
        head="imagenet",
        stages=stages,
        mean=spec.CAFFE_MEAN_RGB,
        std=spec.CAFFE_STD,
    )
    return model, jax.tree.map(lambda value: jnp.asarray(value, jnp.float32), {"params": params})


def _check_keras_shapes(params: dict[str, dict[str, np.ndarray]], what: str) -> None:
    """Each layer's weights must fit the one before it (3x3 kernels, channels chained,
    a flattened square map into fc1), or the model would fail only when applied."""
    channels = 3

    def check(name: str, kernel_shape: tuple, bias_shape: tuple) -> None:
        kernel, bias = params[name]["kernel"].shape, params[name]["bias"].shape
        if kernel != kernel_shape or bias != bias_shape:
            raise WeightFormatError(
                f"{what}: {name} has a kernel of shape {kernel} and a bias of shape {bias}; "
                f"the layers before it need {kernel_shape} and {bias_shape}"
            )

    for name in (name for name in params if name.startswith("conv")):  # in network order
        out = params[name]["kernel"].shape[-1]
        check(name, (3, 3, channels, out), (out,))
        channels = out
    if "fc1" not in params:
        return
    rows = params["fc1"]["kernel"].shape[0] if params["fc1"]["kernel"].ndim == 2 else 0
    side = round((rows / channels) ** 0.5)
    width = channels * max(side, 1) ** 2
    for name in ("fc1", "fc2", "classifier"):
        units = params[name]["kernel"].shape[-1]
        check(name, (width, units), (units,))
        width = units
