"""Streaming input with grain: datasets that do not fit in memory, read and augmented on
the host by worker processes, a batch at a time.

  records (image-folder paths or a TFDS ArrayRecord data source)
    -> MapDataset.source -> seed -> shuffle (a new permutation every epoch: repeat)
    -> this process's share (every process_count-th record)
    -> batch (this process's part of the global batch)
    -> map: decode (OpenCV for JPEG, PIL otherwise) + augment the batch, in the workers
       (uint8 goes to the devices; normalisation stays in the model) -> to_iter_dataset
    -> mp_prefetch (config.input_workers processes, config.input_threads threads each;
       with no workers, the threads decode in the training process)

`StreamInput` (at the end) is what the training loop reads from it, as it reads
`inputs.DeviceInput` for data kept on the devices.

Every batch is a deterministic function of (seed, step): the iterator's state, saved in
the checkpoint beside the model (grain's orbax handler), resumes the same batches, so a
stopped run ends with the parameters of one that never stopped.

Unreadable files (truncated, corrupt, empty) never stop training: in the training
stream the next record takes the place of an unreadable one (a warning names the file
and the epoch's count of skipped files is logged); in evaluation an unreadable image is
masked out, warned about and counted, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from vgg_jax import data_sources, input_pipeline, inputs

logger = logging.getLogger(__name__)

# Augmentations the host workers apply (config.augment); eval is a centre crop after
# resizing the shorter side to image_size * 256 / 224 for the ImageNet-style ones, a
# plain resize to image_size x image_size otherwise.
IMAGENET_STYLE = ("random_resized_crop", "scale_jitter")
EVAL_RESIZE_RATIO = 256 / 224
# How many following records to try in place of an unreadable training record.
REPLACEMENT_TRIES = 16


# ------------------------------------------------------------------------- the records


@dataclasses.dataclass(frozen=True)
class Records:
    """A split as something indexable: element i is (image file path or encoded
    bytes or decoded array, label). `names[i]` says where element i came from."""

    source: Sequence[Any]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.source)

    def name(self, index: int) -> str:
        element = self.source[index]
        return str(element[0]) if isinstance(element, tuple) else f"record {index}"


def image_folder_records(root: str, split: str, class_names=None) -> Records:
    files, names = data_sources.list_image_folder(os.path.expanduser(root), split, class_names)
    return Records([(str(path), label) for path, label in files], names)


class _TfdsRecords(Sequence):
    """A TFDS data source as (image array, label) pairs (decoded where read: in the
    workers)."""

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
    data_sources.import_tensorflow()
    import tensorflow_datasets as tfds

    data_dir = data_sources.resolved_data_dir(data_dir)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # noqa: BLE001 - TFDS raises many kinds here
        raise data_sources.DatasetUnavailableError(
            f"TFDS dataset {name!r} split {split!r} cannot be read as a data source from "
            f"{data_dir} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "prepare it with file_format='array_record' (see the README, 'Data')"
        ) from None
    builder_info = source.dataset_info
    class_names = tuple(builder_info.features["label"].names)
    return Records(_TfdsRecords(source), class_names)


def split_records(config, split: str, class_names=None) -> Records:
    if config.dataset == "image_folder":
        records = image_folder_records(config.data_dir, split, class_names)
    else:
        records = tfds_records(config.dataset, split, config.data_dir)
        if class_names is not None and records.class_names != tuple(class_names):
            raise data_sources.DatasetUnavailableError(
                f"{config.dataset} split {split!r} has other classes than the training split"
            )
    if not len(records):
        raise data_sources.DatasetUnavailableError(f"split {split!r} of {config.dataset} is empty")
    return records


# ------------------------------------------------------------- decoding and augmenting


JPEG_MAGIC = b"\xff\xd8\xff"
# Newer OpenCV decodes JPEG straight to RGB (libjpeg-turbo's own order), saving a pass
# over the full-size image; older versions decode to BGR, converted after.
_DECODE_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def decode(element: Any) -> np.ndarray:
    """An element's image as uint8 RGB (H, W, 3). JPEG files are decoded by OpenCV
    (libjpeg-turbo, no Python per pixel row: several times PIL's speed on the workers);
    anything else by PIL, converted as the in-memory path converts it (transparency on
    white, 16-bit scaled)."""
    data = element[0]
    if isinstance(data, np.ndarray):
        return data if data.shape[-1] == 3 else np.repeat(data[..., :1], 3, axis=-1)
    raw = np.fromfile(data, np.uint8) if isinstance(data, str) else np.frombuffer(data, np.uint8)
    if raw[:3].tobytes() == JPEG_MAGIC:
        image = cv2.imdecode(raw, _DECODE_RGB or cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError("not a decodable JPEG")
        return image if _DECODE_RGB else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if raw.size == 0:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(raw.tobytes())) as image:
        return data_sources.to_rgb_array(image, None)


def resize(image: np.ndarray, width: int, height: int, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear, as tf.image.resize; with an area filter where it shrinks by more than 2x
    (bilinear alone would alias there). Written into `out` when given."""
    shrink = image.shape[1] > 2 * width or image.shape[0] > 2 * height
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    if out is None:
        return cv2.resize(image, (width, height), interpolation=interpolation)
    cv2.resize(image, (width, height), dst=out, interpolation=interpolation)
    return out


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
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_shorter_side(image: np.ndarray, side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = side / min(width, height)
    return resize(image, max(side, round(width * scale)), max(side, round(height * scale)))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return image[top : top + size, left : left + size]


def train_image(
    element: Any,
    draws: Sequence[float],
    size: int,
    augment: str,
    out: np.ndarray | None = None,
    crop_padding: int = 4,
) -> np.ndarray:
    """One training image, decoded and augmented with one row of `random_draws`: uint8
    (size, size, 3), written into `out` when given (a row of the batch)."""
    return augment_image(decode(element), draws, size, augment, out, crop_padding)


def augment_image(
    image: np.ndarray,
    draws: Sequence[float],
    size: int,
    augment: str,
    out: np.ndarray | None = None,
    crop_padding: int = 4,
) -> np.ndarray:
    """A decoded image's training view (`train_image` after the decode); `crop_padding`:
    crop_flip's zero padding on each side."""
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
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
        pad, offsets = crop_padding, 2 * crop_padding + 1
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        top, left = int(draws[_TOP] * offsets), int(draws[_LEFT] * offsets)
        out[...] = padded[top : top + size, left : left + size]
    else:
        cv2.resize(image, (size, size), dst=out, interpolation=cv2.INTER_CUBIC)
    if augment != "none" and draws[_FLIP] < 0.5:
        cv2.flip(out, 1, dst=out)  # in place; numpy's reversed-view copy costs more
    return out


def eval_image(element: Any, size: int, augment: str) -> np.ndarray:
    image = decode(element)
    if augment in IMAGENET_STYLE:
        side = round(size * EVAL_RESIZE_RATIO)
        return np.ascontiguousarray(center_crop(resize_shorter_side(image, side), size))
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)


_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, cv2.error)
cv2.setNumThreads(1)  # the parallelism is the worker processes


# The transforms work a batch at a time: the images are decoded and resized straight into
# the batch's array, and grain's per-element machinery (and a stack) is paid per batch,
# not per image: in threads that Python time held the GIL the decoders need.


class TrainBatch(grain.transforms.Map):
    """(global positions, record indices) of one local batch -> {'image', 'label',
    'skipped', 'index'}: an unreadable record is replaced by the next readable one, and
    counted."""

    def __init__(
        self,
        records: Records,
        size: int,
        augment: str,
        seed: int,
        global_batch: int,
        crop_padding: int = 4,
        flip_only_from_step: int | None = None,
    ):
        self.records, self.size, self.augment = records, size, augment
        self.seed, self.global_batch, self.crop_padding = seed, global_batch, crop_padding
        self.flip_only_from_step = flip_only_from_step

    def map(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        positions, indices = batch
        step = int(positions[0]) // self.global_batch
        draws = random_draws(self.seed, step, self.global_batch)[positions % self.global_batch]
        flip_only = self.flip_only_from_step is not None and step >= self.flip_only_from_step
        padding = 0 if flip_only else self.crop_padding
        rows = len(indices)
        images = np.empty((rows, self.size, self.size, 3), np.uint8)
        labels, skipped = np.empty(rows, np.int32), np.empty(rows, np.int32)
        read = np.empty(rows, np.int64)
        for row in range(rows):
            labels[row], skipped[row], read[row] = self._read_into(
                images[row], int(indices[row]), draws[row].tolist(), padding
            )
        # `index`: the records read (for the logs and tests).
        return {"image": images, "label": labels, "skipped": skipped, "index": read}

    def _read_into(
        self, out: np.ndarray, index: int, draws: list[float], padding: int
    ) -> tuple[int, int, int]:
        for attempt in range(REPLACEMENT_TRIES):
            position = (index + attempt) % len(self.records)
            element = self.records.source[position]
            try:
                train_image(element, draws, self.size, self.augment, out, padding)
            except _UNREADABLE as error:
                logger.warning(
                    "skipping %s: unreadable image (%s)", self.records.name(position), error
                )
                continue
            return element[1], attempt, position
        raise data_sources.DatasetUnavailableError(
            f"{REPLACEMENT_TRIES} unreadable images in a row from {self.records.name(index)} on"
        )


class EvalBatch(grain.transforms.Map):
    """Record indices -> {'image', 'label', 'mask', 'skipped', 'index'}: an unreadable
    image is masked out (zeros, mask 0) and counted."""

    def __init__(self, records: Records, size: int, augment: str):
        self.records, self.size, self.augment = records, size, augment

    def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = len(indices)
        images = np.zeros((rows, self.size, self.size, 3), np.uint8)
        labels, mask = np.empty(rows, np.int32), np.ones(rows, np.float32)
        for row, index in enumerate(indices.tolist()):
            element = self.records.source[index]
            labels[row] = element[1]
            try:
                images[row] = eval_image(element, self.size, self.augment)
            except _UNREADABLE as error:
                logger.warning(
                    "unreadable evaluation image %s (%s)", self.records.name(index), error
                )
                mask[row] = 0.0
        return {
            "image": images,
            "label": labels,
            "mask": mask,
            "skipped": (mask == 0).astype(np.int32),
            "index": indices.astype(np.int64),
        }


# ------------------------------------------------------------------------ the pipelines


def _with_position(position: int, index: int) -> tuple[int, int]:
    return position, index


def train_dataset(
    records: Records,
    *,
    seed: int,
    local_batch: int,
    image_size: int,
    augment: str,
    process_index: int,
    process_count: int,
    crop_padding: int = 4,
    flip_only_from_step: int | None = None,
) -> grain.MapDataset:
    """Batch k of this process: its share of global batch k of the endless, reshuffled
    every epoch, stream of record indices. From global step `flip_only_from_step` on,
    crop_flip flips only (padding 0)."""
    indices = grain.MapDataset.range(len(records)).seed(seed).shuffle().repeat()
    # Each image's random view depends on its place in the global stream (its row of
    # global batch k's draws), not on the number of processes.
    positioned = indices.map_with_index(_with_position)
    share = positioned[process_index::process_count].batch(local_batch, drop_remainder=True)
    global_batch = local_batch * process_count
    transform = TrainBatch(
        records, image_size, augment, seed, global_batch, crop_padding, flip_only_from_step
    )
    return share.map(transform)


def eval_dataset(
    records: Records,
    *,
    local_batch: int,
    image_size: int,
    augment: str,
    process_index: int,
    process_count: int,
) -> tuple[grain.MapDataset, int]:
    """This process's share of the evaluation split in batches, and how many batches
    every process must run (the last ones padded with masked-out examples)."""
    share = grain.MapDataset.range(len(records))[process_index::process_count]
    batches = -(-math.ceil(len(records) / process_count) // local_batch)
    return share.batch(local_batch).map(EvalBatch(records, image_size, augment)), batches


# Batches come back from the workers through pipes rather than shared memory: grain's
# shared-memory buffers still queued when a stream stops are reported as leaked at exit
# (grain issue 398), and the two measured the same here (experiments/RESULTS.md).
NO_SHARED_MEMORY = grain.experimental.DatasetOptions(min_shm_size=2**62)


def read_ahead(threads: int) -> grain.ReadOptions:
    """`threads` batches decoded at once per decoding process, and as many read ahead:
    grain's default (500 elements) would keep hundreds of decoded batches in memory per
    worker and decode far past the end of a run. Threads decode in parallel because
    OpenCV releases the GIL while it decodes and resizes."""
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads))


def iterate(dataset: grain.MapDataset, workers: int, threads: int = 1) -> grain.DatasetIterator:
    """An iterator over `dataset` with `workers` decoding processes (0: in this one), each
    decoding with `threads` threads."""
    if workers < 0:
        workers = max(1, (os.cpu_count() or 2) - 1)
    iterable = dataset.to_iter_dataset(read_ahead(threads))
    if workers > 0:
        # grain's workers read absl flags: in a notebook or test nothing parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iterable = grain.experimental.WithOptionsIterDataset(iterable, NO_SHARED_MEMORY)
        # Two finished batches queued per worker: with one, a worker waits while its batch
        # is piped over (measured: experiments/RESULTS.md).
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
        iterable = iterable.mp_prefetch(options)
    return iter(iterable)


def padded(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A (possibly partial or missing) evaluation batch padded to `size` rows, mask 0."""
    rows = len(batch["label"])
    if rows == size:
        return batch
    return {
        name: np.concatenate([array, np.zeros((size - rows, *array.shape[1:]), array.dtype)])
        for name, array in batch.items()
    }


class EvalPasses:
    """Evaluation passes over this process's share, every one from the same iterator over
    the repeated split: the decoding processes start once per run, not once per
    evaluation (each start imports the libraries again: seconds per evaluation)."""

    def __init__(
        self,
        dataset: grain.MapDataset,
        batches: int,
        local_batch: int,
        image_size: int,
        workers: int,
        threads: int = 1,
    ):
        self.dataset, self.batches, self.local_batch = dataset, batches, local_batch
        self.workers, self.threads = workers, threads
        self.empty = {
            "image": np.zeros((0, image_size, image_size, 3), np.uint8),
            "label": np.zeros((0,), np.int32),
            "mask": np.zeros((0,), np.float32),
            "skipped": np.zeros((0,), np.int32),
            "index": np.zeros((0,), np.int64),
        }
        self.iterator = None

    def one_pass(self) -> Iterator[dict[str, np.ndarray]]:
        """Exactly `batches` padded batches: this process's share, then empty ones."""
        own = len(self.dataset)
        if self.iterator is None and own:
            self.iterator = iterate(self.dataset.repeat(), self.workers, self.threads)
        finished = False
        try:
            for batch in range(self.batches):
                local = next(self.iterator) if batch < own else self.empty
                yield padded(local, self.local_batch)
            finished = True
        finally:
            if not finished:  # stopped mid-pass: the next pass must start at its start
                self.close()

    def close(self) -> None:
        if self.iterator is not None:
            self.iterator.close()
            self.iterator = None


# ------------------------------------------------- the training loop's input


class StreamInput:
    """A grain stream read by `config.input_workers` processes, a batch per step."""

    kind = "stream"

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.config, self.mesh = config, mesh
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.train_records = split_records(config, config.train_split)
        self.eval_records = split_records(config, config.eval_split, self.train_records.class_names)
        inputs.check_batch_fits(config, len(self.train_records))
        self.local_batch = config.batch_size // self.process_count
        self.local_eval_batch = (config.eval_batch_size or config.batch_size) // self.process_count
        mean, std = inputs.global_stats(self._sample_sums())
        self.info = data_sources.DatasetInfo(
            class_names=self.train_records.class_names,
            mean=mean,
            std=std,
            image_size=config.image_size,
            num_train_examples=len(self.train_records),
            num_eval_examples=len(self.eval_records),
        )
        self.steps_per_epoch = inputs.limited_steps(config, len(self.train_records))
        self.dataset = train_dataset(
            self.train_records,
            seed=config.seed,
            local_batch=self.local_batch,
            image_size=config.image_size,
            augment=config.augment,
            process_index=self.process_index,
            process_count=self.process_count,
            crop_padding=config.crop_padding,
            flip_only_from_step=self._first_flip_only_step(),
        )
        self.iterator, self.eval_passes = None, None
        self.next_step = 0
        self.sharding = NamedSharding(mesh, P(input_pipeline.DATA_AXIS))
        self.wait_seconds, self.skipped_files, self.eval_skipped_files = 0.0, 0, 0

    def _first_flip_only_step(self) -> int | None:
        first = inputs.first_flip_only_epoch(self.config)
        return None if first is None else first * self.steps_per_epoch

    def _sample_sums(self, count: int = 512) -> np.ndarray:
        """Channel sums over a fixed sample of up to `count` training images (evaluation
        views): the data's own normalisation without reading all of it. Each process
        reads the part of the sample in its share."""
        sample = np.random.default_rng(0).choice(
            len(self.train_records), min(count, len(self.train_records)), replace=False
        )
        mine = sample[sample % self.process_count == self.process_index]
        transform = EvalBatch(self.train_records, self.config.image_size, self.config.augment)
        views = transform.map(mine)
        pixels = views["image"][views["mask"] > 0]
        if not len(pixels):
            return np.zeros((3, 3))
        return inputs.channel_sums(pixels)

    def close(self) -> None:
        """Stops the worker processes."""
        self._close_train_stream()
        if self.eval_passes is not None:
            self.eval_passes.close()

    def _close_train_stream(self) -> None:
        if self.iterator is not None:
            self.iterator.close()
            self.iterator = None

    def _iterator(self, global_step: int):
        if self.iterator is None or self.next_step != global_step:
            # A fresh stream positioned at `global_step` (batches are indexed by step).
            self._close_train_stream()
            self.iterator = iterate(
                self.dataset[global_step:], self.config.input_workers, self.config.input_threads
            )
            self.next_step = global_step
        return self.iterator

    def to_devices(self, local: dict[str, np.ndarray], global_rows: int) -> dict[str, jax.Array]:
        return {
            name: jax.make_array_from_process_local_data(
                self.sharding, array, (global_rows, *array.shape[1:])
            )
            for name, array in local.items()
            if name not in ("skipped", "index")
        }

    def train_steps(self, epoch: int, start: int) -> Iterator[tuple]:
        """(device batch,) for each remaining step of `epoch`, read from the stream."""
        iterator = self._iterator(epoch * self.steps_per_epoch + start)
        for _ in range(start, self.steps_per_epoch):
            began = time.perf_counter()
            local = next(iterator)
            batch = self.to_devices(local, self.config.batch_size)
            self.wait_seconds += time.perf_counter() - began
            self.skipped_files += int(local["skipped"].sum())
            self.next_step += 1
            yield (batch,)

    def eval_steps(self) -> Iterator[tuple]:
        if self.eval_passes is None:
            dataset, batches = eval_dataset(
                self.eval_records,
                local_batch=self.local_eval_batch,
                image_size=self.config.image_size,
                augment=self.config.augment,
                process_index=self.process_index,
                process_count=self.process_count,
            )
            self.eval_passes = EvalPasses(
                dataset,
                batches,
                self.local_eval_batch,
                self.config.image_size,
                self.config.input_workers,
                self.config.input_threads,
            )
        global_rows = self.local_eval_batch * self.process_count
        for local in self.eval_passes.one_pass():
            self.eval_skipped_files += int(local["skipped"].sum())
            yield (self.to_devices(local, global_rows),)

    def checkpoint_items(self) -> dict[str, Any]:
        if self.iterator is None:
            return {}
        return {"data": grain.checkpoint.CheckpointSave(self.iterator)}

    def restore(self, manager, step: int) -> None:
        """Restores the stream's position saved with `step` (grain's handler); where the
        checkpoint has none for this number of processes, the stream is positioned by
        the step alone, which gives the same batches."""
        import orbax.checkpoint as ocp

        iterator = iterate(self.dataset, self.config.input_workers, self.config.input_threads)
        try:
            manager.restore(
                step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator))
            )
        except (ValueError, KeyError, FileNotFoundError) as error:
            logger.info("stream position from the step (%s)", str(error).splitlines()[0][:120])
            iterator.close()
            return
        self._close_train_stream()
        self.iterator, self.next_step = iterator, step

    def take_epoch_counts(self) -> dict[str, float]:
        counts = {
            "input_wait_seconds": self.wait_seconds,
            "train_skipped_files": self.skipped_files,
            "test_skipped_files": self.eval_skipped_files,
        }
        self.wait_seconds, self.skipped_files, self.eval_skipped_files = 0.0, 0, 0
        return counts
