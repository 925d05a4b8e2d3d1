"""What a model and a predictor need to know about a dataset, and the dataset errors:
the leaf of the data package, imported by everything that handles a dataset's facts."""

from __future__ import annotations

import dataclasses
from importlib import resources

import ml_collections

from vgg_jax import spec

# Class counts of well-known TFDS datasets: what the benchmark needs without any data.
KNOWN_CLASS_COUNTS = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither prepared nor obtainable, or unusable as it is; the message
    says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The training data's class names, input normalisation and sizes."""

    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per-channel, 0..255 units
    std: tuple[float, ...]
    image_size: int
    num_train_examples: int
    num_eval_examples: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> DatasetInfo:
        fields = {}
        for field in dataclasses.fields(cls):
            value = values[field.name]
            fields[field.name] = tuple(value) if isinstance(value, list) else value
        return cls(**fields)

    @classmethod
    def without_data(cls, config: ml_collections.ConfigDict) -> DatasetInfo:
        """ImageNet statistics and numbered classes: for timing a model, not training."""
        if config.dataset == "synthetic":
            classes = config.synthetic_classes
        elif config.dataset in KNOWN_CLASS_COUNTS:
            classes = KNOWN_CLASS_COUNTS[config.dataset]
        else:
            raise DatasetUnavailableError(
                f"the class count of dataset {config.dataset!r} is not known without its "
                "data; use --config.dataset=synthetic --config.synthetic_classes=N"
            )
        names = tuple(str(i) for i in range(classes))
        return cls(names, spec.IMAGENET_MEAN, spec.IMAGENET_STD, config.image_size, 0, 0)


def imagenet_class_names() -> tuple[str, ...]:
    """ImageNet-1k's class names in the order of torchvision's and Keras's outputs."""
    text = resources.files("vgg_jax.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)
