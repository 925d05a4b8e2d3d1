"""`vgg_jax.load(path)`: a checkpoint -> a jitted predictor for notebooks and the CLIs.

model = vgg_jax.load("/tmp/vgg16")            # a workdir, its checkpoints/ or a step
probs = model.predict(["dog.png", pil_image, uint8_array])
model.class_names[probs[0].argmax()]
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from vgg_jax import checkpoint, data_sources, models

ImageLike = str | os.PathLike | Image.Image | np.ndarray
# A PIL image (any mode) and the model's input size -> uint8 RGB (size, size, 3).
Resize = Callable[[Image.Image, int], np.ndarray]


class ImageError(ValueError):
    """One input could not be read as an image; the message names it."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file, refusing decompression bombs (images with
    more than PIL's MAX_IMAGE_PIXELS, about 89 megapixels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(
            f"{path}: refused, too many pixels (decompression bomb?): {error}"
        ) from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: truncated or corrupt image ({error})") from None


def to_model_input(
    image: ImageLike, image_size: int, resize: Resize = data_sources.to_rgb_array
) -> np.ndarray:
    """Any image -> uint8 RGB (image_size, image_size, 3). `resize` makes the picture
    square: by default converted and resized exactly as the training inputs were (see
    data_sources.to_rgb_array). A uint8 array of exactly that shape is taken as it is."""
    if isinstance(image, str | os.PathLike):
        with open_image(image) as opened:
            return resize(opened, image_size)
    if isinstance(image, Image.Image):
        return resize(image, image_size)
    array = np.asarray(image)
    if array.dtype == np.uint8 and array.shape == (image_size, image_size, 3):
        return array
    if array.dtype != np.uint8:
        raise ImageError(f"arrays must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return resize(Image.fromarray(array), image_size)


class Predictor:
    """A trained VGG ready to classify images on whatever device this process has."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        variables: dict[str, Any],
        info: data_sources.DatasetInfo,
        step: int,
        batch_size: int = 256,
        resize: Resize = data_sources.to_rgb_array,
    ):
        """`resize`: how a picture becomes the model's square input (see
        `to_model_input`); pretrained weights bring their source's recipe."""
        self.config = config
        self.variables = variables
        self.info = info
        self.step = step
        self.batch_size = batch_size
        self.resize = resize
        self.model = models.build_model(config, info)
        model = self.model
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
        return np.stack([to_model_input(image, self.image_size, self.resize) for image in images])

    def predict(self, images: ImageLike | Iterable[ImageLike]) -> np.ndarray:
        """Class probabilities, shape (N, num_classes), for the given images."""
        batch = self.preprocess(images)
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


def valid_step(value: str) -> bool:
    return value in ("latest", "best") or value.isdigit()


def parse_step(value: str) -> int | str:
    """A --step flag: 'latest', 'best' or a number."""
    if not valid_step(value):
        raise ValueError(f"step must be 'latest', 'best' or a number, got {value!r}")
    return int(value) if value.isdigit() else value


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
            info = data_sources.DatasetInfo.from_json(meta["dataset"])
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
    good, errors, inputs = [], [], []
    for path in paths:
        try:
            inputs.append(to_model_input(path, predictor.image_size, predictor.resize))
            good.append(path)
        except ImageError as error:
            errors.append(str(error))
    probabilities = predictor.predict(np.stack(inputs)) if inputs else np.zeros((0,))
    return list(zip(good, probabilities, strict=True)), errors
