"""`vgg_jax.load(path)`: a checkpoint -> a jitted predictor for notebooks and the CLIs.

model = vgg_jax.load("/tmp/vgg16")            # a workdir, its checkpoints/ or a step
probs = model.predict(["dog.png", pil_image, uint8_array])
model.class_names[probs[0].argmax()]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from vgg_jax import checkpoint, models
from vgg_jax.data import views
from vgg_jax.data.info import DatasetInfo

ImageLike = str | os.PathLike | Image.Image | np.ndarray


class ImageError(ValueError):
    """One input could not be read as an image; the message names it."""


# Decoding's errors -> what ImageError says after the image's name; the first match wins
# (each is one of views.UNREADABLE).
IMAGE_ERRORS = (
    (FileNotFoundError, "no such file"),
    (Image.UnidentifiedImageError, "not an image file"),
    (Image.DecompressionBombError, "refused, too many pixels (decompression bomb?): {}"),
    (views.TooManyPixelsError, "refused, {}"),
    (views.NotRegularFileError, "not a regular file (a folder, FIFO or device)"),
    (views.UNREADABLE, "truncated or corrupt image ({})"),
)


def read_image(image: ImageLike) -> np.ndarray:
    """A path, a PIL image or an array -> uint8 RGB (H, W, 3), decoded as training
    decodes (`views.decode`); a file that cannot be read raises ImageError naming it."""
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        raise ImageError(f"arrays must be uint8 (0..255), got {image.dtype}")
    try:
        return views.decode(image)
    except views.UNREADABLE as error:
        words = next(words for kind, words in IMAGE_ERRORS if isinstance(error, kind))
        raise ImageError(f"{image}: {words.format(error)}") from None


class Predictor:
    """A trained VGG ready to classify images on whatever device this process has."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        variables: dict[str, Any],
        info: DatasetInfo,
        step: int,
        batch_size: int = 256,
        view: views.View | None = None,
    ):
        """`view`: how a decoded picture becomes the model's input; by default the
        evaluation view of `config`, the one training evaluated on (pretrained weights
        bring their source's)."""
        self.config = config
        self.variables = variables
        self.info = info
        self.step = step
        self.batch_size = batch_size
        self.view = view or views.eval_view(config)
        model = self.model = models.build_model(config, info)
        self._probabilities = jax.jit(
            lambda variables, images: jax.nn.softmax(model.apply(variables, images), -1)
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def preprocess(self, images: ImageLike | Iterable[ImageLike]) -> np.ndarray:
        """Images -> a uint8 (N, size, size, 3) batch. A 4-D uint8 array is a batch."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, str | os.PathLike | Image.Image | np.ndarray):
            images = [images]
        return np.stack([self.view(read_image(image)) for image in images])

    def predict(self, images: ImageLike | Iterable[ImageLike]) -> np.ndarray:
        """Class probabilities, shape (N, num_classes), for the given images."""
        return self.predict_views(self.preprocess(images))

    def predict_views(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a uint8 (N, size, size, 3) batch already viewed."""
        chunks = [
            self._probabilities(self.variables, jnp.asarray(batch[start : start + self.batch_size]))
            for start in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate([np.asarray(chunk) for chunk in chunks])

    def top_k(self, probabilities: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """(class name, probability) of the k most likely classes for each row."""
        order = np.argsort(-probabilities, axis=-1)[:, :k]
        return [
            [(self.class_names[i], float(row[i])) for i in indices]
            for row, indices in zip(probabilities, order, strict=True)
        ]


def load(path: str | os.PathLike, step: int | str = "latest") -> Predictor:
    """Loads a checkpoint written by any device count onto this process's first device.

    `path`: a workdir, its `checkpoints/` folder, or one step's folder.
    `step`: 'latest' (default), 'best' (highest test accuracy) or a step number.
    """
    located = checkpoint.locate(os.fspath(path), step)
    manager = checkpoint.create_manager(located.directory, read_only=True)
    try:
        config = checkpoint.read_config(manager, located.step)
        meta = checkpoint.read_meta(manager, located.step)
        try:
            info = DatasetInfo.from_json(meta["dataset"])
        except (KeyError, TypeError, ValueError) as error:
            raise checkpoint.DamagedCheckpointError(
                located.directory, located.step, f"its meta item has no dataset info ({error!r})"
            ) from None
        model = models.build_model(config, info)
        images = jax.ShapeDtypeStruct((1, info.image_size, info.image_size, 3), jnp.uint8)
        shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
        target = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        variables = checkpoint.restore_model(
            manager, located.step, checkpoint.abstract_like(target, device)
        )
    except checkpoint.DamagedCheckpointError as error:
        raise error.naming_others(located.steps) from None
    finally:
        manager.close()
    return Predictor(config, variables, info, located.step)


def predict_files(
    predictor: Predictor, paths: Sequence[str]
) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Probabilities for every readable file, and one error line for every other."""
    good, errors, images = [], [], []
    for path in paths:
        try:
            images.append(predictor.view(read_image(path)))
            good.append(path)
        except ImageError as error:
            errors.append(str(error))
    probabilities = predictor.predict_views(np.stack(images)) if images else np.zeros((0,))
    return list(zip(good, probabilities, strict=True)), errors
