"""Where a run's batches come from: device-resident splits (data that fits, such as
CIFAR) or a grain stream (anything larger), chosen by `config.input`.

Both give the training loop the same things: the dataset's info, steps per epoch, the
arguments of each training step and evaluation step, what to checkpoint beside the
model, and per-epoch counts (seconds spent waiting for input, unreadable files skipped).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax import data_sources, input_pipeline, optim
from vgg_jax.configuration import DEVICE_AUGMENTATIONS
from vgg_jax.data_sources import DatasetInfo

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
    return DeviceInput(config, mesh) if kind == "device" else StreamInput(config, mesh)


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


# ------------------------------------------------------------------------- streaming


class StreamInput:
    """A grain stream read by `config.input_workers` processes, a batch per step."""

    kind = "stream"

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        from vgg_jax import streaming  # grain and OpenCV: only a streamed run loads them

        self.config, self.mesh = config, mesh
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.train_records = streaming.split_records(config, config.train_split)
        self.eval_records = streaming.split_records(
            config, config.eval_split, self.train_records.class_names
        )
        check_batch_fits(config, len(self.train_records))
        self.local_batch = config.batch_size // self.process_count
        self.local_eval_batch = (config.eval_batch_size or config.batch_size) // self.process_count
        mean, std = global_stats(self._sample_sums())
        self.info = DatasetInfo(
            class_names=self.train_records.class_names,
            mean=mean,
            std=std,
            image_size=config.image_size,
            num_train_examples=len(self.train_records),
            num_eval_examples=len(self.eval_records),
        )
        self.steps_per_epoch = limited_steps(config, len(self.train_records))
        self.dataset = streaming.train_dataset(
            self.train_records,
            seed=config.seed,
            local_batch=self.local_batch,
            image_size=config.image_size,
            augment=config.augment,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        self.iterator, self.eval_passes = None, None
        self.next_step = 0
        self.sharding = NamedSharding(mesh, P(input_pipeline.DATA_AXIS))
        self.wait_seconds, self.skipped_files, self.eval_skipped_files = 0.0, 0, 0

    def _sample_sums(self, count: int = 512) -> np.ndarray:
        """Channel sums over a fixed sample of up to `count` training images (evaluation
        views): the data's own normalisation without reading all of it. Each process
        reads the part of the sample in its share."""
        from vgg_jax import streaming

        sample = np.random.default_rng(0).choice(
            len(self.train_records), min(count, len(self.train_records)), replace=False
        )
        mine = sample[sample % self.process_count == self.process_index]
        transform = streaming.EvalBatch(
            self.train_records, self.config.image_size, self.config.augment
        )
        views = transform.map(mine)
        pixels = views["image"][views["mask"] > 0]
        if not len(pixels):
            return np.zeros((3, 3))
        return channel_sums(pixels)

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
        from vgg_jax import streaming

        if self.iterator is None or self.next_step != global_step:
            # A fresh stream positioned at `global_step` (batches are indexed by step).
            self._close_train_stream()
            self.iterator = streaming.iterate(
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
        from vgg_jax import streaming

        if self.eval_passes is None:
            dataset, batches = streaming.eval_dataset(
                self.eval_records,
                local_batch=self.local_eval_batch,
                image_size=self.config.image_size,
                augment=self.config.augment,
                process_index=self.process_index,
                process_count=self.process_count,
            )
            self.eval_passes = streaming.EvalPasses(
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
        import grain

        if self.iterator is None:
            return {}
        return {"data": grain.checkpoint.CheckpointSave(self.iterator)}

    def restore(self, manager, step: int) -> None:
        """Restores the stream's position saved with `step` (grain's handler); where the
        checkpoint has none for this number of processes, the stream is positioned by
        the step alone, which gives the same batches."""
        import grain
        import orbax.checkpoint as ocp

        from vgg_jax import streaming

        iterator = streaming.iterate(
            self.dataset, self.config.input_workers, self.config.input_threads
        )
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
