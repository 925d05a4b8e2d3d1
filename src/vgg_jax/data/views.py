"""The only code that turns an image into model input: decoding, the training views, the
evaluation view of each augmentation family (docs/architecture.md) and the views
published weights were trained with. JPEG is decoded by OpenCV (the same pixels as PIL,
several times faster), anything else by PIL; OpenCV resizes. It is imported on first
use: a device-resident run of data already at the model's size (CIFAR) never loads it.
"""

from __future__ import annotations

import functools
import io
import math
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

# The ImageNet-style augmentations crop from a larger image; their evaluation view is the
# centre crop of the image resized (shorter side) to image_size * 256 / 224.
IMAGENET_STYLE = ("random_resized_crop", "scale_jitter")
EVAL_RESIZE_RATIO = 256 / 224
# More pixels than this is refused, not decoded (PIL's own limit: about 89 megapixels, a
# quarter of a gigabyte as RGB): a decompression bomb, or a scan far beyond any model input.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
JPEG_MAGIC = b"\xff\xd8\xff"
# What an unreadable image raises, anywhere here.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# decode refuses images over MAX_PIXELS itself, in one line; PIL's warning would only
# repeat it on stderr.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# A decoded image -> the model's uint8 (size, size, 3) input.
View = Callable[[np.ndarray], np.ndarray]
# Threads that decode a batch at a time where no worker processes do (evaluation, checks):
# OpenCV and PIL release the GIL while they decode.
DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))


class NotRegularFileError(ValueError):
    """An image path that is a FIFO, a device or a folder: refused, not read."""


class TooManyPixelsError(ValueError):
    """An image with more than MAX_PIXELS pixels: refused before it is decoded."""


# ------------------------------------------------------------------------------ decoding


@functools.cache
def _cv2():
    import cv2

    cv2.setNumThreads(1)  # the parallelism is the worker processes and threads
    return cv2


def read_file(path: str | os.PathLike) -> bytes:
    """A regular file's bytes. A FIFO, device or folder named like an image is refused
    rather than read (a FIFO would block the reader forever)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFileError("not a regular file")
    with open(path, "rb") as file:
        return file.read()


def decode(data: Any) -> np.ndarray:
    """An image file's path, its encoded bytes, a PIL image or a decoded array -> uint8
    RGB (H, W, 3): grey repeated, 16-bit scaled, transparency composited on white."""
    if isinstance(data, Image.Image):
        return np.asarray(to_rgb(data), np.uint8)
    if isinstance(data, np.ndarray):
        if data.ndim == 2:
            data = data[..., None]
        return data if data.shape[-1] == 3 else np.repeat(data[..., :1], 3, axis=-1)
    raw = read_file(data) if isinstance(data, str | os.PathLike) else bytes(data)
    if not raw:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(raw)) as image:  # reads the header only
        if image.width * image.height > MAX_PIXELS:
            raise TooManyPixelsError(
                f"{image.width}x{image.height} pixels, over the {MAX_PIXELS} accepted "
                "(decompression bomb?)"
            )
        if raw[:3] != JPEG_MAGIC:
            image.load()
            return np.asarray(to_rgb(image), np.uint8)
    cv2 = _cv2()
    # Newer OpenCV decodes JPEG straight to RGB (libjpeg-turbo's own order), saving a pass
    # over the full-size image; older versions decode to BGR, converted after.
    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)
    try:
        decoded = cv2.imdecode(np.frombuffer(raw, np.uint8), rgb or cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise ValueError(f"not a decodable JPEG ({error})") from None
    if decoded is None:
        raise ValueError("not a decodable JPEG")
    return decoded if rgb else cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image of any mode as RGB: 16/32-bit grayscale scaled to 8 bits,
    transparency composited on white (as a viewer shows it)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / top * 255.0).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


# ---------------------------------------------------------------------------- resizing


def resize(
    image: np.ndarray, width: int, height: int, out: np.ndarray | None = None, cubic: bool = False
) -> np.ndarray:
    """Bilinear, as tf.image.resize (bicubic with `cubic`); with an area filter where it
    shrinks by more than 2x (either alone would alias there). Written into `out` when
    given."""
    cv2 = _cv2()
    if image.shape[1] > 2 * width or image.shape[0] > 2 * height:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC if cubic else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), dst=out, interpolation=interpolation)


def squash(image: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """The whole image resized (bicubic) to size x size: the evaluation view of 'none'
    and 'crop_flip'. An image already of that size is copied unchanged."""
    if image.shape[:2] != (size, size):
        return resize(image, size, size, out, cubic=True)
    if out is None:
        return image.copy()
    out[...] = image
    return out


def resize_shorter_side(image: np.ndarray, side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = side / min(width, height)
    return resize(image, max(side, round(width * scale)), max(side, round(height * scale)))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


# ----------------------------------------------------------------------- the eval views


def center_view(image: np.ndarray, size: int) -> np.ndarray:
    """The ImageNet-style evaluation view: the shorter side resized to size * 256 / 224,
    then the centre size x size."""
    return center_crop(resize_shorter_side(image, round(size * EVAL_RESIZE_RATIO)), size)


def eval_view(config: ml_collections.ConfigDict) -> View:
    """The view a model trained with `config` is evaluated on, wherever it is evaluated."""
    family = center_view if config.augment in IMAGENET_STYLE else squash
    return functools.partial(family, size=config.image_size)


def torchvision_view(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's eval transform for its ImageNet weights (Resize(256), CenterCrop(224)
    at 224) with PIL, as torchvision does it: shorter side to size * 256 / 224, bilinear
    with antialiasing, then the centre square."""
    picture = Image.fromarray(image)
    shorter = round(size * EVAL_RESIZE_RATIO)
    width, height = picture.size
    if width <= height:
        new = (shorter, int(shorter * height / width))
    else:
        new = (int(shorter * width / height), shorter)
    if new != picture.size:
        picture = picture.resize(new, Image.Resampling.BILINEAR)
    left = int(round((new[0] - size) / 2.0))
    top = int(round((new[1] - size) / 2.0))
    return np.asarray(picture.crop((left, top, left + size, top + size)), np.uint8)


def keras_view(image: np.ndarray, size: int) -> np.ndarray:
    """What keras.utils.load_img(path, target_size=(size, size)) does: the whole picture
    resized to a square, nearest neighbour (with PIL, as Keras)."""
    if image.shape[:2] == (size, size):
        return image
    picture = Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(picture, np.uint8)


# ---------------------------------------------------------------------- training views

# Each training image's random view comes from a row of uniform [0, 1) numbers drawn for
# its global batch at once (numpy's per-call cost, paid per image, was a large part of a
# worker's Python time): ten tries of crop area and aspect ratio, the crop's left and top
# offsets, the flip.
_TRIES = 10
_AREA, _RATIO, _LEFT, _TOP, _FLIP = 0, _TRIES, 2 * _TRIES, 2 * _TRIES + 1, 2 * _TRIES + 2
DRAWS_PER_IMAGE = 2 * _TRIES + 3
_LOG_RATIO_LOW, _LOG_RATIO_HIGH = math.log(3 / 4), math.log(4 / 3)


def random_draws(seed: int, step: int, count: int) -> np.ndarray:
    """The numbers behind the random views of global batch `step`: row j for the batch's
    j-th image, whichever process reads it (float64, (count, DRAWS_PER_IMAGE))."""
    return np.random.default_rng((seed, step)).random((count, DRAWS_PER_IMAGE))


def crop_box(width: int, height: int, draws: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, width, height) from one row of
    draws: area 8-100%, aspect ratio 3/4-4/3 (log-uniform), 10 tries, else the central
    crop of the nearest allowed ratio."""
    area = width * height
    for attempt in range(_TRIES):
        target = area * (0.08 + 0.92 * draws[_AREA + attempt])
        log_ratio = _LOG_RATIO_LOW + (_LOG_RATIO_HIGH - _LOG_RATIO_LOW) * draws[_RATIO + attempt]
        w = round(math.sqrt(target * math.exp(log_ratio)))
        h = round(math.sqrt(target / math.exp(log_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(draws[_LEFT] * (width - w + 1)), int(draws[_TOP] * (height - h + 1)), w, h
    # The central crop of the nearest allowed ratio: only the side that makes it too long
    # or too wide is cut.
    w, h = min(width, round(height * (4 / 3))), min(height, round(width / (3 / 4)))
    return (width - w) // 2, (height - h) // 2, w, h


def train_view(
    image: np.ndarray,
    draws: Sequence[float],
    size: int,
    augment: str,
    out: np.ndarray | None = None,
    crop_padding: int = 4,
) -> np.ndarray:
    """A decoded image's random training view for `augment` from one row of
    `random_draws`, written into `out` when given. crop_flip crops the squashed image
    (its evaluation view) padded by `crop_padding` zeros, as the device input does."""
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    if augment == "random_resized_crop":
        left, top, w, h = crop_box(image.shape[1], image.shape[0], draws)
        resize(image[top : top + h, left : left + w], size, size, out)
    elif augment == "scale_jitter":
        # The paper's scale jittering: shorter side S in [256, 512] (at 224), random crop.
        low = round(size * EVAL_RESIZE_RATIO)
        image = resize_shorter_side(image, low + int(draws[_AREA] * (low + 1)))
        top = int(draws[_TOP] * (image.shape[0] - size + 1))
        left = int(draws[_LEFT] * (image.shape[1] - size + 1))
        out[...] = image[top : top + size, left : left + size]
    elif augment == "crop_flip":
        pad, offsets = crop_padding, 2 * crop_padding + 1
        padded = np.pad(squash(image, size), ((pad, pad), (pad, pad), (0, 0)))
        top, left = int(draws[_TOP] * offsets), int(draws[_LEFT] * offsets)
        out[...] = padded[top : top + size, left : left + size]
    else:
        squash(image, size, out)
    if augment != "none" and draws[_FLIP] < 0.5:
        _cv2().flip(out, 1, dst=out)  # in place; numpy's reversed-view copy costs more
    return out


def first_flip_only_epoch(config: ml_collections.ConfigDict) -> int | None:
    """The first epoch (from 0) of the last `config.flip_only_last_epochs`, in which
    crop_flip flips and never crops, so that training ends on the test images' framing."""
    if not config.flip_only_last_epochs:
        return None
    return max(0, config.num_epochs - config.flip_only_last_epochs)


def crop_padding(config: ml_collections.ConfigDict, epoch: int) -> int:
    """crop_flip's padding in `epoch` (from 0)."""
    first = first_flip_only_epoch(config)
    return 0 if first is not None and epoch >= first else config.crop_padding


# ------------------------------------------------------------- batches of eval views


def eval_batch(
    elements: Sequence[tuple[Any, int]],
    view: View,
    size: int,
    describe: Callable[[int], str],
    map_rows: Callable = map,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """(image source, label) pairs -> {'image', 'label', 'mask'} through `view`, the rows
    viewed by `map_rows` (a thread pool's map, say); an unreadable image is zeros with
    mask 0. Also one 'name: why' line per unreadable one (`describe(i)` names element i)."""
    images = np.zeros((len(elements), size, size, 3), np.uint8)
    mask = np.ones(len(elements), np.float32)

    def view_row(row: int) -> str | None:
        try:
            images[row] = view(decode(elements[row][0]))
        except UNREADABLE as error:
            mask[row] = 0.0
            return f"{describe(row)}: {error}"
        return None

    problems = [problem for problem in map_rows(view_row, range(len(elements))) if problem]
    labels = np.asarray([label for _, label in elements], np.int32)
    return {"image": images, "label": labels, "mask": mask}, problems
