"""Where a run's batches come from: device-resident splits (data that fits, such as
CIFAR) or a grain stream (anything larger), chosen by `config.input`.

Both give the training loop the same things: the dataset's info, steps per epoch, the
arguments of each training step and evaluation step, what to checkpoint beside the
model, and per-epoch counts (seconds spent waiting for input, unreadable files skipped).
The streamed one, `streaming.StreamInput`, lives with the grain pipeline it reads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vgg_jax import data_sources, input_pipeline, optim
from vgg_jax.configuration import DEVICE_AUGMENTATIONS
from vgg_jax.data_sources import DatasetInfo

if TYPE_CHECKING:
    from vgg_jax.streaming import StreamInput

logger = logging.getLogger(__name__)


def source_kwargs(config: ml_collections.ConfigDict, data_dir: str | None = None) -> dict:
    """The arguments of `data_sources.load_split` that `config` determines, for this
    process's share of a split."""
    return {
        "data_dir": data_dir or config.data_dir,
        "image_size": config.image_size,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "synthetic_sizes": (config.synthetic_train_size, config.synthetic_eval_size),
        "synthetic_classes": config.synthetic_classes,
    }


def channel_sums(images: np.ndarray) -> np.ndarray:
    """(3, channels): per-channel sum, sum of squares and count of the pixels."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
    return np.stack([pixels.sum(0), (pixels**2).sum(0), np.full(pixels.shape[1], len(pixels))])


def global_stats(sums: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (0..255 units) over the pixels of every
    process: the sums are added up across processes (exact: integers in float64), so
    every process builds the same model, whatever the number of processes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        sums = np.asarray(multihost_utils.process_allgather(sums)).sum(0)
    total, squares, count = sums
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


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


def check_batch_fits(config: ml_collections.ConfigDict, num_examples: int) -> None:
    if num_examples < config.batch_size:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the training split "
            f"({num_examples} examples)"
        )


def limited_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    steps = optim.steps_per_epoch(num_examples, config.batch_size)
    return min(steps, config.max_steps_per_epoch or steps)


# ----------------------------------------------------------------- the choice of input


def train_split_bytes(config: ml_collections.ConfigDict) -> int | None:
    """The training split's size as uint8 images, where known without reading it."""
    per_image = config.image_size * config.image_size * 3
    if config.dataset == "synthetic":
        return config.synthetic_train_size * per_image
    if config.dataset == "image_folder":
        files, _ = data_sources.list_image_folder(
            os.path.expanduser(config.data_dir), config.train_split
        )
        return len(files) * per_image
    return None


def choose(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """'device' or 'stream', and why (the log says it)."""
    if config.input != "auto":
        return config.input, "config.input"
    if config.augment not in DEVICE_AUGMENTATIONS:
        return "stream", f"augment={config.augment!r} runs on the host"
    size = train_split_bytes(config)
    if size is None:
        return "device", "a TFDS dataset: device-resident unless config.input='stream'"
    budget = config.device_input_budget_gb * 2**30
    kind = "device" if size <= budget else "stream"
    relation = "within" if kind == "device" else "over"
    return kind, (
        f"the training split is {size / 2**30:.2f} GiB as uint8 at {config.image_size}px, "
        f"{relation} the {config.device_input_budget_gb:g} GiB device budget"
    )


def create(config: ml_collections.ConfigDict, mesh: Mesh) -> DeviceInput | StreamInput:
    kind, why = choose(config)
    logger.info("input: %s (%s)", kind, why)
    if kind == "device":
        return DeviceInput(config, mesh)
    from vgg_jax.streaming import StreamInput  # grain and OpenCV: only a streamed run loads them

    return StreamInput(config, mesh)


# ------------------------------------------------------------------- device-resident


def load_data(config: ml_collections.ConfigDict):
    """Both splits of this process, in host memory, and what a predictor needs of them."""
    kwargs = source_kwargs(config)
    train_split = data_sources.load_split(config.dataset, config.train_split, **kwargs)
    eval_split = data_sources.load_split(
        config.dataset, config.eval_split, class_names=train_split.class_names, **kwargs
    )
    mean, std = global_stats(channel_sums(train_split.images))
    info = DatasetInfo(
        class_names=train_split.class_names,
        mean=mean,
        std=std,
        image_size=config.image_size,
        num_train_examples=train_split.num_examples_global,
        num_eval_examples=eval_split.num_examples_global,
    )
    return train_split, eval_split, info


class DeviceInput:
    """Both splits on the devices once; each epoch permuted and augmented by one jit."""

    kind = "device"

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.config, self.mesh = config, mesh
        train_split, eval_split, self.info = load_data(config)
        check_batch_fits(config, train_split.num_examples_global)
        self.train_data = input_pipeline.put_train_split(train_split, mesh)
        eval_batch_size = config.eval_batch_size or config.batch_size
        self.eval_data = input_pipeline.put_eval_batches(eval_split, eval_batch_size, mesh)
        self.steps_per_epoch = limited_steps(config, self.train_data.num_examples)
        self.data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
        self.skipped_files = len(train_split.skipped)  # counted once, at load
        self.wait_seconds = 0.0

    def train_steps(self, epoch: int, start: int) -> Iterator[tuple]:
        """(epoch's batches, index) for each remaining step of `epoch`."""
        began = time.perf_counter()
        batches = input_pipeline.epoch_batches(
            self.train_data,
            jax.random.fold_in(self.data_key, epoch),
            steps=self.steps_per_epoch,
            batch_size=self.config.batch_size,
            augment=self.config.augment,
            mesh=self.mesh,
            crop_padding=crop_padding(self.config, epoch),
        )
        self.wait_seconds += time.perf_counter() - began
        for index in range(start, self.steps_per_epoch):
            yield batches, index

    def eval_steps(self) -> Iterator[tuple]:
        for index in range(self.eval_data["label"].shape[0]):
            yield self.eval_data, index

    def checkpoint_items(self) -> dict[str, Any]:
        return {}

    def restore(self, manager, step: int) -> None:
        """Nothing to restore: the data order is a function of (seed, epoch)."""

    def close(self) -> None:
        """Nothing to stop."""

    def take_epoch_counts(self) -> dict[str, float]:
        counts = {"input_wait_seconds": self.wait_seconds}
        self.wait_seconds = 0.0
        return counts
