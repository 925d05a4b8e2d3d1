"""Datasets -> host uint8 arrays: TFDS, an image folder, or a synthetic learnable set.

Every loader returns this process's share of a split as `(images, labels)`, with
images uint8 NHWC at the configured size and labels int32. TensorFlow is imported
only on the TFDS path, so the image-folder and synthetic paths run without it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from vgg_jax import spec

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CIFAR10_TARBALL = "cifar-10-binary.tar.gz"


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither prepared nor obtainable; the message says what to do."""


# Class counts of well-known TFDS datasets: what the benchmark needs without any data.
KNOWN_CLASS_COUNTS = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a predictor need to know about the training data."""

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
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(
            **{
                name: tuple(value) if isinstance(value, list) else value
                for name, value in values.items()
                if name in names
            }
        )

    @classmethod
    def without_data(cls, config) -> DatasetInfo:
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
        return cls(
            tuple(str(i) for i in range(classes)),
            spec.IMAGENET_MEAN,
            spec.IMAGENET_STD,
            config.image_size,
            0,
            0,
        )


@dataclasses.dataclass(frozen=True)
class Split:
    """One process's share of one split, in host memory."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int32 (N,)
    class_names: tuple[str, ...]
    num_examples_global: int  # rows in the whole split, over all processes
    skipped: tuple[str, ...] = ()  # this process's unreadable files, left out


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The [start, end) rows of a split that one process loads (contiguous, near-equal)."""
    per_process = -(-num_examples // process_count)
    start = min(num_examples, process_index * per_process)
    return start, min(num_examples, start + per_process)


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir: str | None,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    synthetic_sizes: Sequence[int] = (2048, 512),
    synthetic_classes: int = 10,
    class_names: Sequence[str] | None = None,
) -> Split:
    """Loads this process's part of `split` of `dataset` (a TFDS name, 'image_folder',
    or 'synthetic'). `class_names`: the training split's classes, which an evaluation
    split's labels must index (an image folder's test classes are mapped through them)."""
    if dataset == "synthetic":
        loaded = load_synthetic(
            split, image_size, synthetic_sizes, synthetic_classes, process_index, process_count
        )
    elif dataset == "image_folder":
        if not data_dir:
            raise DatasetUnavailableError(
                "dataset='image_folder' needs --config.data_dir=DIR holding "
                "DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg"
            )
        root = os.path.expanduser(data_dir)
        return load_image_folder(root, split, image_size, process_index, process_count, class_names)
    else:
        loaded = load_tfds(dataset, split, data_dir, image_size, process_index, process_count)
    if class_names is not None and tuple(class_names) != loaded.class_names:
        raise DatasetUnavailableError(
            f"{dataset} split {split!r} has classes {loaded.class_names}, expected "
            f"{tuple(class_names)}"
        )
    return loaded


# ---------------------------------------------------------------------------- image folder


def _visible(path: Path) -> bool:
    """Not a dot-file (macOS '._x.jpg' sidecars, '.DS_Store')."""
    return not path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if _visible(path) and path.suffix.lower() in IMAGE_SUFFIXES
    )


# What image folders call their evaluation split: any of these stands for the others.
EVAL_SPLIT_NAMES = ("validation", "val", "test")


def split_folder(root: str, split: str) -> Path:
    """root/split, or for an evaluation split the folder the dataset has of
    validation/val/test (ImageNet-style folders say 'val', CIFAR-style ones 'test')."""
    root = os.path.expanduser(root)
    candidates = [split] + [n for n in EVAL_SPLIT_NAMES if split in EVAL_SPLIT_NAMES and n != split]
    for name in candidates:
        if (Path(root) / name).is_dir():
            return Path(root) / name
    raise DatasetUnavailableError(
        f"image folder {Path(root) / split} does not exist; expected "
        f"{root}/{{train,test}}/<class name>/<image files>"
    )


def list_image_folder(
    root: str, split: str, class_names: Sequence[str] | None = None
) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """(path, label) for every image under root/split/<class>/ and the class names,
    sorted by name. With `class_names` (the training split's), the split must have
    exactly those classes and labels index them. A class folder without images stops
    here, naming it."""
    split_dir = split_folder(root, split)
    folders = {p.name: p for p in split_dir.iterdir() if _visible(p) and p.is_dir()}
    if not folders:
        raise DatasetUnavailableError(f"image folder {split_dir} has no class sub-folders")
    images = {name: _images_in(folder) for name, folder in sorted(folders.items())}
    empty = [name for name, paths in images.items() if not paths]
    if empty:
        raise DatasetUnavailableError(
            f"image folder {split_dir}: class folder(s) without images: {', '.join(empty)}; "
            "add images or remove the folder(s)"
        )
    names = tuple(images) if class_names is None else tuple(class_names)
    unknown = sorted(set(images) - set(names))
    missing = sorted(set(names) - set(images))
    if unknown or missing:
        raise DatasetUnavailableError(
            f"image folder {split_dir} does not have the training classes: "
            + "; ".join(
                part
                for part in (
                    unknown and f"classes not in training: {', '.join(unknown)}",
                    missing and f"training classes with no {split} images: {', '.join(missing)}",
                )
                if part
            )
        )
    files = [(path, names.index(name)) for name, paths in images.items() for path in paths]
    return files, names


def read_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image file -> uint8 (image_size, image_size, 3) RGB, resized with bicubic."""
    with Image.open(path) as image:
        return to_rgb_array(image, image_size)


def to_rgb_array(image: Image.Image, image_size: int | None) -> np.ndarray:
    """A PIL image of any mode -> uint8 RGB (image_size, image_size, 3); at its own size
    when `image_size` is None."""
    image = to_rgb(image)
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image of any mode as RGB: 16/32-bit grayscale scaled to 8 bits,
    transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clipping.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / top * 255.0).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency on white, as a viewer shows it.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image_folder(
    root: str,
    split: str,
    image_size: int,
    process_index: int,
    process_count: int,
    class_names: Sequence[str] | None = None,
) -> Split:
    """This process's share of an image folder split, decoded. An unreadable file
    (truncated, corrupt, empty, not an image) is left out with one warning naming it;
    a class left with no readable image at all stops the run."""
    files, names = list_image_folder(root, split, class_names)
    start, end = process_range(len(files), process_index, process_count)
    images, labels, skipped = [], [], []
    for path, label in files[start:end]:
        try:
            images.append(read_image(path, image_size))
            labels.append(label)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            logger.warning("skipping %s: unreadable image (%s)", path, error)
            skipped.append(str(path))
    if skipped:
        logger.warning("%s split: skipped %d unreadable file(s)", split, len(skipped))
    if process_count == 1:
        empty = sorted(set(range(len(names))) - set(labels))
        if empty:
            raise DatasetUnavailableError(
                f"image folder {Path(root) / split}: no readable image in class(es) "
                + ", ".join(names[i] for i in empty)
            )
    if not images:
        raise DatasetUnavailableError(f"no readable image in this process's share of {split}")
    return Split(np.stack(images), np.asarray(labels, np.int32), names, len(files), tuple(skipped))


# ------------------------------------------------------------------------------- synthetic


def load_synthetic(
    split: str,
    image_size: int,
    sizes: Sequence[int],
    num_classes: int,
    process_index: int,
    process_count: int,
) -> Split:
    """A small learnable dataset made offline: each class is a fixed coarse colour
    pattern; every example is its class's pattern, shifted by up to 3 pixels, with
    random contrast and Gaussian noise. A tiny VGG learns it in a few epochs."""
    num_examples = sizes[0] if split == "train" else sizes[1]
    pattern_rng = np.random.default_rng(1234)  # the same classes for every split
    coarse = pattern_rng.uniform(0, 255, (num_classes, 4, 4, 3))
    repeat = -(-image_size // 4)
    patterns = coarse.repeat(repeat, 1).repeat(repeat, 2)[:, :image_size, :image_size]
    rng = np.random.default_rng(0 if split == "train" else 1)
    labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
    shifts = rng.integers(-3, 4, (num_examples, 2))
    contrast = rng.uniform(0.3, 1.0, (num_examples, 1, 1, 1))
    noise = rng.normal(0, 96, (num_examples, image_size, image_size, 3))
    images = np.stack(
        [np.roll(patterns[y], tuple(s), axis=(0, 1)) for y, s in zip(labels, shifts, strict=True)]
    )
    images = np.clip((images - 128) * contrast + 128 + noise, 0, 255).astype(np.uint8)
    start, end = process_range(num_examples, process_index, process_count)
    names = tuple(f"class_{i}" for i in range(num_classes))
    return Split(images[start:end], labels[start:end], names, num_examples)


# ------------------------------------------------------------------------------------ TFDS


TFDS_EXTRA_HINT = "pip install 'vgg-jax[tfds]' (TensorFlow and tensorflow-datasets)"


def import_tensorflow():
    """Imports TensorFlow for TFDS, hidden from GPUs so that JAX keeps them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tensorflow_datasets  # noqa: F401
    except ImportError as error:
        raise DatasetUnavailableError(
            f"TFDS datasets need TensorFlow ({error.name} is not installed): "
            f"{TFDS_EXTRA_HINT}; or use --config.dataset=image_folder"
        ) from None

    tf.config.set_visible_devices([], "GPU")
    return tf


def network_available(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    """Whether a TFDS download could start: a name lookup and one TCP connect, bounded."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolved_data_dir(data_dir: str | None) -> str:
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def prepare_tfds(builder, name: str, data_dir: str) -> None:
    """Prepares a TFDS dataset from the manual folder or the network, or says how."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    manual_dir = os.path.join(data_dir, "downloads", "manual")
    has_manual_files = os.path.isdir(manual_dir) and bool(os.listdir(manual_dir))
    if not has_manual_files and not network_available():
        hint = (
            f"put {CIFAR10_TARBALL} (from https://www.cs.toronto.edu/~kriz/{CIFAR10_TARBALL}) "
            f"in {manual_dir}/ and rerun"
            if name.startswith("cifar10")
            else f"put the files it downloads in {manual_dir}/ and rerun"
        )
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} is not prepared in {data_dir} and cannot be downloaded "
            f"(no network): {hint}; or use --config.dataset=image_folder, or configs/smoke.py"
        )
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except NonMatchingChecksumError:
        raise DatasetUnavailableError(
            f"a file TFDS read for {name!r} (in {manual_dir}/ or downloaded) does not have "
            "the official size and checksum: delete it and download it again"
            + (
                f" from https://www.cs.toronto.edu/~kriz/{CIFAR10_TARBALL}"
                if name.startswith("cifar10")
                else ""
            )
        ) from None


def load_tfds(
    name: str,
    split: str,
    data_dir: str | None,
    image_size: int,
    process_index: int,
    process_count: int,
) -> Split:
    tf = import_tensorflow()
    import tensorflow_datasets as tfds

    data_dir = resolved_data_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetUnavailableError(f"TFDS has no dataset named {name!r}") from None
    if not builder.is_prepared():
        prepare_tfds(builder, name, data_dir)
    known_splits = builder.info.splits
    if known_splits and split not in known_splits:
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} has no split {split!r}; it has {sorted(known_splits)}"
        )
    if known_splits:
        num_examples = known_splits[split].num_examples
        start, end = process_range(num_examples, process_index, process_count)
        dataset = builder.as_dataset(split=f"{split}[{start}:{end}]", shuffle_files=False)
    else:
        # A builder without split metadata (tfds.testing.mock_data): size unknown ahead.
        dataset = builder.as_dataset(split=split, shuffle_files=False)
        num_examples = None

    def to_rgb_uint8(example):
        image = example["image"]
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        if image.shape[0] != image_size or image.shape[1] != image_size:
            image = tf.image.resize(image, (image_size, image_size), method="bicubic")
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image, tf.cast(example["label"], tf.int32)

    dataset = dataset.map(to_rgb_uint8, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    images, labels = [], []
    for image_batch, label_batch in tfds.as_numpy(dataset):
        images.append(image_batch)
        labels.append(label_batch)
    class_names = tuple(builder.info.features["label"].names)
    images, labels = np.concatenate(images), np.concatenate(labels)
    if num_examples is None:
        num_examples = len(labels)
        start, end = process_range(num_examples, process_index, process_count)
        images, labels = images[start:end], labels[start:end]
    return Split(images, labels, class_names, num_examples)
