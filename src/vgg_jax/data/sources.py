"""Where images come from: TFDS (TensorFlow imported only there), an image folder, or a
synthetic learnable set, as a `Source` (read lazily, in order), `Records` (random access:
the stream) or a decoded `Split` in host memory (the device input).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from vgg_jax.data import views
from vgg_jax.data.info import DatasetUnavailableError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CIFAR10_TARBALL = "cifar-10-binary.tar.gz"
# What image folders call their evaluation split: any of these stands for the others.
EVAL_SPLIT_NAMES = ("validation", "val", "test")
TFDS_EXTRA_HINT = "pip install 'vgg-jax[tfds]' (TensorFlow and tensorflow-datasets)"


@dataclasses.dataclass(frozen=True)
class Source:
    """A split: `read(start, end)` yields its elements [start, end) in order, each
    (image file path, encoded bytes or decoded array; label); `name(i)` says where
    element i comes from."""

    class_names: tuple[str, ...]
    size: int
    read: Callable[[int, int], Iterator[tuple[Any, int]]]
    name: Callable[[int], str]


@dataclasses.dataclass(frozen=True)
class Records:
    """A split with random access (the grain stream): `source[i]` is element i."""

    source: Sequence[tuple[Any, int]]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        data = self.source[index][0]
        return str(data) if isinstance(data, str) else f"record {index}"


@dataclasses.dataclass(frozen=True)
class Split:
    """One process's share of one split, decoded, in host memory."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int32 (N,)
    class_names: tuple[str, ...]
    num_examples_global: int  # elements in the whole split, over all processes
    skipped: tuple[str, ...] = ()  # this process's unreadable files, left out
    indices: np.ndarray | None = None  # each row's element index in the split


def process_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The [start, end) elements of a split that one process loads (contiguous, near-equal)."""
    per_process = -(-num_examples // process_count)
    start = min(num_examples, process_index * per_process)
    return start, min(num_examples, start + per_process)


def open_split(
    config: ml_collections.ConfigDict,
    split: str,
    class_names: Sequence[str] | None = None,
    data_dir: str | None = None,
) -> Source:
    """`split` of `config.dataset`. `class_names`: the training split's, which an
    evaluation split's labels must index."""
    if config.dataset in ("synthetic", "image_folder"):
        return records_source(records(config, split, class_names, data_dir))
    source = tfds_source(config.dataset, split, data_dir or config.data_dir)
    _check_split(config, split, class_names, source.class_names, source.size)
    return source


def _check_split(config, split: str, expected, class_names: tuple[str, ...], size: int) -> None:
    """`split` must have examples, and the training split's classes (`expected`)."""
    if expected is not None and tuple(expected) != class_names:
        raise DatasetUnavailableError(
            f"{config.dataset} split {split!r} has classes {class_names}, expected "
            f"{tuple(expected)} (the training split's)"
        )
    if not size:
        raise DatasetUnavailableError(f"split {split!r} of {config.dataset} is empty")


def records_source(records: Records) -> Source:
    def read(start: int, end: int) -> Iterator[tuple[Any, int]]:
        for index in range(start, end):
            yield records.source[index]

    return Source(records.class_names, len(records), read, records.name)


def load_split(
    source: Source, view: views.View, process_index: int = 0, process_count: int = 1
) -> Split:
    """This process's share of `source`, each image decoded and viewed. An unreadable
    file is left out with one warning naming it; a class left with no readable image
    at all (on one process) stops here."""
    start, end = process_range(source.size, process_index, process_count)
    images, labels, indices, skipped, seen = [], [], [], [], set()
    for index, (data, label) in enumerate(source.read(start, end), start):
        seen.add(label)
        try:
            images.append(view(views.decode(data)))
        except views.UNREADABLE as error:
            logger.warning("skipping %s: unreadable image (%s)", source.name(index), error)
            skipped.append(source.name(index))
            continue
        labels.append(label)
        indices.append(index)
    if skipped:
        logger.warning("skipped %d unreadable file(s)", len(skipped))
    if process_count == 1:
        empty = sorted(seen - set(labels))
        if empty:
            raise DatasetUnavailableError(
                "no readable image in class(es) " + ", ".join(source.class_names[i] for i in empty)
            )
    if not images:
        raise DatasetUnavailableError("no readable image in this process's share of the split")
    return Split(
        np.stack(images),
        np.asarray(labels, np.int32),
        source.class_names,
        source.size,
        tuple(skipped),
        np.asarray(indices, np.int64),
    )


# ---------------------------------------------------------------------------- image folder


def _visible(path: Path) -> bool:
    """Not a dot-file (macOS '._x.jpg' sidecars, '.DS_Store')."""
    return not path.name.startswith(".")


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
    exactly those classes and labels index them; without, at least two classes (a
    classifier of one class learns nothing). A class folder without images stops here."""
    split_dir = split_folder(root, split)
    folders = {p.name: p for p in split_dir.iterdir() if _visible(p) and p.is_dir()}
    if not folders:
        raise DatasetUnavailableError(f"image folder {split_dir} has no class sub-folders")
    if class_names is None and len(folders) < 2:
        raise DatasetUnavailableError(
            f"image folder {split_dir} has one class ({', '.join(folders)}): a classifier "
            "needs at least two class folders"
        )
    # Entries named like images: one that is not a regular file (a FIFO, say) is refused
    # when read, with a warning naming it.
    images = {
        name: sorted(
            p for p in folder.iterdir() if _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES
        )
        for name, folder in sorted(folders.items())
    }
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
        parts = [
            unknown and f"classes not in training: {', '.join(unknown)}",
            missing and f"training classes with no {split} images: {', '.join(missing)}",
        ]
        raise DatasetUnavailableError(
            f"image folder {split_dir} does not have the training classes: "
            + "; ".join(part for part in parts if part)
        )
    files = [(path, names.index(name)) for name, paths in images.items() for path in paths]
    return files, names


def image_folder_records(root: str, split: str, class_names=None) -> Records:
    if not root:
        raise DatasetUnavailableError(
            "dataset='image_folder' needs --config.data_dir=DIR holding "
            "DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg"
        )
    files, names = list_image_folder(root, split, class_names)
    return Records([(str(path), label) for path, label in files], names)


# ------------------------------------------------------------------------------- synthetic


def synthetic_records(config: ml_collections.ConfigDict, split: str) -> Records:
    """A small learnable dataset made offline: each class is a fixed coarse colour
    pattern; every example is its class's pattern, shifted by up to 3 pixels, with
    random contrast and Gaussian noise. A tiny VGG learns it in a few epochs."""
    size, num_classes = config.image_size, config.synthetic_classes
    train = split == "train"
    num_examples = config.synthetic_train_size if train else config.synthetic_eval_size
    pattern_rng = np.random.default_rng(1234)  # the same classes for every split
    coarse = pattern_rng.uniform(0, 255, (num_classes, 4, 4, 3))
    repeat = -(-size // 4)
    patterns = coarse.repeat(repeat, 1).repeat(repeat, 2)[:, :size, :size]
    rng = np.random.default_rng(0 if train else 1)
    labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
    shifts = rng.integers(-3, 4, (num_examples, 2))
    contrast = rng.uniform(0.3, 1.0, (num_examples, 1, 1, 1))
    noise = rng.normal(0, 96, (num_examples, size, size, 3))
    images = np.stack(
        [np.roll(patterns[y], tuple(s), axis=(0, 1)) for y, s in zip(labels, shifts, strict=True)]
    )
    images = np.clip((images - 128) * contrast + 128 + noise, 0, 255).astype(np.uint8)
    names = tuple(f"class_{i}" for i in range(num_classes))
    return Records(list(zip(images, labels.tolist(), strict=True)), names)


# ------------------------------------------------------------------------------------ TFDS


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
    cifar = name.startswith("cifar10")
    official = f"https://www.cs.toronto.edu/~kriz/{CIFAR10_TARBALL}"
    if not has_manual_files and not network_available():
        hint = (
            f"put {CIFAR10_TARBALL} (from {official}) in {manual_dir}/ and rerun"
            if cifar
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
            + (f" from {official}" if cifar else "")
        ) from None


def tfds_source(name: str, split: str, data_dir: str | None) -> Source:
    """A TFDS split read in order through tf.data, a few thousand examples at a time."""
    import_tensorflow()
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
        size = known_splits[split].num_examples
    else:  # a builder without split metadata (tfds.testing.mock_data): count it
        size = int(builder.as_dataset(split=split).reduce(0, lambda count, _: count + 1))

    def read(start: int, end: int) -> Iterator[tuple[Any, int]]:
        if known_splits:  # TFDS reads only the files that hold the range
            dataset = builder.as_dataset(split=f"{split}[{start}:{end}]", shuffle_files=False)
        else:
            dataset = builder.as_dataset(split=split, shuffle_files=False)
            dataset = dataset.skip(start).take(end - start)
        dataset = dataset.batch(1024).prefetch(1)
        for batch in tfds.as_numpy(dataset.map(lambda e: (e["image"], e["label"]))):
            yield from zip(batch[0], batch[1].astype(int).tolist(), strict=True)

    class_names = tuple(builder.info.features["label"].names)
    return Source(class_names, size, read, lambda index: f"{name} {split}[{index}]")


class _TfdsRecords(Sequence):
    """A TFDS data source as (image array, label) pairs, decoded where read (workers)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        example = self.source[index]
        return example["image"], int(example["label"])


def tfds_records(name: str, split: str, data_dir: str | None) -> Records:
    """A TFDS dataset prepared as ArrayRecord (`file_format="array_record"`), read
    through `tfds.data_source` (random access, no TensorFlow graph)."""
    import_tensorflow()
    import tensorflow_datasets as tfds

    data_dir = resolved_data_dir(data_dir)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # noqa: BLE001 - TFDS raises many kinds here
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} split {split!r} cannot be read as a data source from "
            f"{data_dir} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "prepare it with file_format='array_record' (see docs/data.md, 'ImageNet')"
        ) from None
    class_names = tuple(source.dataset_info.features["label"].names)
    return Records(_TfdsRecords(source), class_names)


def records(
    config: ml_collections.ConfigDict, split: str, class_names=None, data_dir: str | None = None
) -> Records:
    """`split` with random access: synthetic, an image folder, or TFDS as ArrayRecord."""
    data_dir = data_dir or config.data_dir
    if config.dataset == "synthetic":
        found = synthetic_records(config, split)
    elif config.dataset == "image_folder":
        found = image_folder_records(data_dir, split, class_names)
    else:
        found = tfds_records(config.dataset, split, data_dir)
    _check_split(config, split, class_names, found.class_names, len(found))
    return found


def check_every_class_readable(split: Records) -> None:
    """Each class must have a readable image (tried in order until one decodes): a class
    whose files are all unreadable would otherwise train as if it had no examples."""
    first: dict[int, list[int]] = {}
    for index in range(len(split)):
        first.setdefault(split.source[index][1], []).append(index)

    def readable(indices: list[int]) -> bool:
        for index in indices:
            try:
                views.decode(split.source[index][0])
                return True
            except views.UNREADABLE:
                continue
        return False

    with ThreadPoolExecutor(views.DECODE_THREADS) as pool:
        found = dict(zip(first, pool.map(readable, first.values()), strict=True))
    empty = [split.class_names[label] for label, ok in sorted(found.items()) if not ok]
    if empty:
        raise DatasetUnavailableError(
            f"no readable image in training class(es) {', '.join(empty)}: every file is "
            "unreadable (truncated, corrupt or empty)"
        )
