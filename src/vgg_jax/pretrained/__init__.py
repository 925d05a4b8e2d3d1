"""ImageNet VGG weights from torchvision and Keras as Flax variables, and back to PyTorch
(docs/pretrained.md). The model normalises its input as its source did: it takes raw RGB."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vgg_jax import models, spec
from vgg_jax.data import views
from vgg_jax.data.info import DatasetInfo, imagenet_class_names
from vgg_jax.pretrained.finetune import merge_variables, start_from
from vgg_jax.pretrained.keras import from_keras
from vgg_jax.pretrained.registry import (
    TORCH_SUFFIXES,
    WEIGHT_FILES,
    WeightFile,
    WeightFormatError,
    WeightsUnavailableError,
    arch_name,
    cache_dir,
    fetch,
    preset_of,
)
from vgg_jax.pretrained.torchvision import (
    export_state_dict,
    from_torchvision,
    read_sidecar,
    to_torchvision,
    torchvision_constructor,
    torchvision_feature_index,
    torchvision_layout,
    torchvision_state_dict,
    write_state_dict,
)

if TYPE_CHECKING:
    from vgg_jax import inference

__all__ = [
    "WEIGHT_FILES",
    "WeightFile",
    "WeightFormatError",
    "WeightsUnavailableError",
    "cache_dir",
    "export_state_dict",
    "fetch",
    "from_checkpoint",
    "from_keras",
    "from_torchvision",
    "imagenet_class_names",
    "load",
    "merge_variables",
    "start_from",
    "predictor",
    "to_torchvision",
    "torchvision_constructor",
    "torchvision_feature_index",
    "torchvision_layout",
    "torchvision_state_dict",
    "write_state_dict",
]


def load(source: str | os.PathLike, arch: str | None = None) -> tuple[models.VGG, dict]:
    """(model, variables) from published weights by name ('torchvision:vgg16_bn',
    'keras:vgg19', see `WEIGHT_FILES`), a weight file (.pth/.pt/.bin or .safetensors in
    torchvision's layout, Keras .h5), or a training workdir / checkpoint of this package."""
    text = os.fspath(source)
    if text in WEIGHT_FILES:
        reader = from_keras if text.startswith("keras:") else from_torchvision
        return reader(fetch(text), arch or arch_name(*spec.PRETRAINED[text]))
    path = Path(text).expanduser()
    if path.is_dir():
        return from_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{text}: no such file or folder, and not one of {sorted(WEIGHT_FILES)}"
        )
    if path.suffix == ".h5":
        return from_keras(path, arch)
    if path.suffix in (*TORCH_SUFFIXES, ".safetensors"):
        return from_torchvision(path, arch)
    raise WeightFormatError(
        f"{path}: unknown weight file type; expected .pth/.pt/.bin/.safetensors "
        "(torchvision's layout) or .h5 (Keras)"
    )


def from_checkpoint(path: str | os.PathLike, step: int | str = "latest") -> tuple[models.VGG, dict]:
    """(model, variables) of a checkpoint written by `python -m vgg_jax.main`."""
    from vgg_jax import inference

    predictor = inference.load(path, step)
    return predictor.model, predictor.variables


# ------------------------------------------------------------------ classifying images


def predictor(source: str | os.PathLike, arch: str | None = None) -> inference.Predictor:
    """An `inference.Predictor` (`predict`, `top_k` with ImageNet's class names) for
    anything `load` takes; pictures are resized and cropped as the source library does
    for its weights (`views.torchvision_view`, `views.keras_view`), or, for a file written
    by `python -m vgg_jax.export`, at the size and in the view its training evaluated."""
    from vgg_jax import configuration, inference

    text = os.fspath(source)
    if Path(text).expanduser().is_dir():
        return inference.load(text)
    model, variables = load(source, arch)
    if "classifier" not in variables["params"]:
        raise ValueError(f"{text} holds the convolutions only (no classifier): use features")
    keras_source = text.startswith("keras:") or text.endswith(".h5")
    stages = tuple(tuple(block) for block in model.stages)
    channels = stages[-1][-1]
    side = round((variables["params"]["fc1"]["kernel"].shape[0] // channels) ** 0.5)
    image_size = 224 if model.head == "torchvision" else side * 2 ** len(stages)
    sidecar = {} if keras_source or text in WEIGHT_FILES else read_sidecar(Path(text).expanduser())
    if "image_size" in sidecar:  # exported by vgg_jax.export: the size it was trained at
        image_size = sidecar["image_size"]
        if not isinstance(image_size, int) or image_size < 1:
            raise WeightFormatError(f"{text}.json: image_size {image_size!r} is no size")
    config = configuration.default_config()
    preset = preset_of(stages)
    config.model = preset or "vgg16"
    config.stages = None if preset else stages
    config.batch_norm = model.batch_norm
    config.conv_dropout = "none"
    config.head = model.head
    config.image_size = image_size
    config.dataset = text
    if "class_names" in sidecar:
        class_names = tuple(sidecar["class_names"])
    elif model.num_classes == 1000:
        class_names = imagenet_class_names()
    else:
        class_names = tuple(str(i) for i in range(model.num_classes))
    info = DatasetInfo(class_names, tuple(model.mean), tuple(model.std), image_size, 0, 0)
    if "image_size" in sidecar:  # our own training's evaluation view (vgg_jax.load's)
        config.augment = sidecar.get("augment", "none")
        view = views.eval_view(config)
    else:
        source_view = views.keras_view if keras_source else views.torchvision_view
        view = functools.partial(source_view, size=image_size)
    return inference.Predictor(config, variables, info, step=0, view=view)
