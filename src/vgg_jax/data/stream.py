"""Splits that do not fit on the devices, streamed with grain: read and augmented on
the host by worker processes, a batch at a time.

  records (image-folder paths or a TFDS ArrayRecord data source)
    -> MapDataset.source -> seed -> shuffle (a new permutation every epoch: repeat)
    -> this process's share (every process_count-th record)
    -> batch (this process's part of the global batch)
    -> map: decode + the training view of each image (`views`), a batch at a time, in the
       workers (uint8 goes to the devices; normalisation stays in the model)
    -> to_iter_dataset
    -> mp_prefetch (config.input_workers processes, config.input_threads threads each;
       with no workers, the threads decode in the training process)

Every batch is a deterministic function of (seed, step), so a resumed run ends with the
parameters of one that never stopped (`StreamInput.restore`). Unreadable files never
stop training: they are replaced (training) or masked out (evaluation), and counted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh

from vgg_jax.data import sharding, stats, views
from vgg_jax.data.info import DatasetUnavailableError
from vgg_jax.data.interface import Input
from vgg_jax.data.sources import Records, check_every_class_readable, records
from vgg_jax.data.workers import SUPERVISOR, quiet_resource_tracker, worker_init

logger = logging.getLogger(__name__)

# How many following records to try in place of an unreadable training record.
REPLACEMENT_TRIES = 16


# The transforms work a batch at a time, decoding straight into the batch's array: grain's
# per-element machinery (and a stack) is paid per batch, not per image, holding the GIL
# the decoding threads need.


# repr=False: grain names each map step by str(transform), and a generated repr would
# list every record of the split.
@dataclasses.dataclass(repr=False, eq=False)
class TrainBatch(grain.transforms.Map):
    """(global positions, record indices) of one local batch -> {'image', 'label',
    'skipped', 'index'}: an unreadable record is replaced by the next readable one, and
    counted."""

    records: Records
    size: int
    augment: str
    seed: int
    global_batch: int
    crop_padding: int
    flip_only_from_step: int | None
    warned: set[int] = dataclasses.field(default_factory=set)  # once per bad file and process

    def map(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        positions, indices = batch
        step = int(positions[0]) // self.global_batch
        rows = views.random_draws(self.seed, step, self.global_batch)
        draws = rows[positions % self.global_batch]
        flip_only = self.flip_only_from_step is not None and step >= self.flip_only_from_step
        padding = 0 if flip_only else self.crop_padding
        count = len(indices)
        images = np.empty((count, self.size, self.size, 3), np.uint8)
        labels, skipped = np.empty(count, np.int32), np.empty(count, np.int32)
        read = np.empty(count, np.int64)  # the records read (for the logs and tests)
        for row in range(count):
            labels[row], skipped[row], read[row] = self._read_into(
                images[row], int(indices[row]), draws[row].tolist(), padding
            )
        return {"image": images, "label": labels, "skipped": skipped, "index": read}

    def _read_into(
        self, out: np.ndarray, index: int, draws: list[float], padding: int
    ) -> tuple[int, int, int]:
        for attempt in range(REPLACEMENT_TRIES):
            position = (index + attempt) % len(self.records)
            data, label = self.records.source[position]
            try:
                views.train_view(views.decode(data), draws, self.size, self.augment, out, padding)
            except views.UNREADABLE as error:
                if position not in self.warned:
                    self.warned.add(position)
                    logger.warning(
                        "skipping training image %s: unreadable (%s)",
                        self.records.name(position),
                        error,
                    )
                continue
            return label, attempt, position
        raise DatasetUnavailableError(
            f"{REPLACEMENT_TRIES} unreadable images in a row from {self.records.name(index)} on"
        )


class EvalBatch(grain.transforms.Map):
    """Record indices -> {'image', 'label', 'mask', 'skipped', 'index'} through the
    evaluation view: an unreadable image is masked out (zeros, mask 0) and counted."""

    def __init__(self, records: Records, view: views.View, size: int, what: str = "evaluation"):
        self.records, self.view, self.size, self.what = records, view, size, what
        self.warned: set[str] = set()  # each bad file is warned about once per process

    def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        elements = [self.records.source[index] for index in indices.tolist()]
        batch, problems = views.eval_batch(
            elements, self.view, self.size, lambda row: self.records.name(int(indices[row]))
        )
        for problem in problems:
            if problem not in self.warned:
                self.warned.add(problem)
                logger.warning("unreadable %s image %s", self.what, problem)
        batch["skipped"] = (batch["mask"] == 0).astype(np.int32)
        batch["index"] = indices
        return batch


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


# Batches come back from the workers through pipes rather than shared memory: grain's
# shared-memory buffers still queued when a stream stops are reported as leaked at exit
# (grain issue 398), and the two measured the same here (experiments/RESULTS.md).
NO_SHARED_MEMORY = grain.experimental.DatasetOptions(min_shm_size=2**62)


def iterate(dataset: grain.MapDataset, workers: int, threads: int = 1) -> grain.DatasetIterator:
    """An iterator over `dataset` with `workers` decoding processes (0: in this one), each
    decoding with `threads` threads; the processes are supervised (`data/workers.py`)."""
    if workers < 0:
        workers = max(1, (os.cpu_count() or 2) - 1)
    # `threads` batches decoded at once (OpenCV releases the GIL while it decodes and
    # resizes) and as many read ahead: grain's default (500 elements) would keep hundreds
    # of decoded batches in memory per worker and decode far past the end of a run.
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads))
    iterable = dataset.to_iter_dataset(read)
    if workers > 0:
        # grain's workers read absl flags: in a notebook or test nothing parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iterable = grain.experimental.WithOptionsIterDataset(iterable, NO_SHARED_MEMORY)
        # Two finished batches queued per worker: with one, a worker waits while its batch
        # is piped over (measured: experiments/RESULTS.md).
        quiet_resource_tracker()
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
        iterable = iterable.mp_prefetch(options, worker_init_fn=worker_init(os.getpid()))
        SUPERVISOR.start()
    return iter(iterable)


def close(iterator: grain.DatasetIterator) -> None:
    """Closes an iterator; its workers' exits are not reported as deaths."""
    with SUPERVISOR.stopping():
        iterator.close()


class EvalPasses:
    """Evaluation passes over this process's share of `records` in batches of evaluation
    views, every one from the same iterator over the repeated split: the decoding
    processes start once per run, not once per evaluation (each start imports the
    libraries again: seconds per evaluation)."""

    def __init__(
        self,
        records: Records,
        *,
        local_batch: int,
        view: views.View,
        image_size: int,
        process_index: int,
        process_count: int,
        workers: int,
        threads: int = 1,
    ):
        transform = EvalBatch(records, view, image_size)
        share = grain.MapDataset.range(len(records))[process_index::process_count]
        self.dataset = share.batch(local_batch).map(transform)
        # Every process runs as many batches as the largest share needs.
        self.batches = -(-math.ceil(len(records) / process_count) // local_batch)
        self.local_batch, self.workers, self.threads = local_batch, workers, threads
        self.empty = transform.map(np.zeros(0, np.int64))
        self.iterator = None

    def one_pass(self, passes_left: int) -> Iterator[dict[str, np.ndarray]]:
        """Exactly `batches` padded batches: this process's share, then empty ones.
        `passes_left` (this one included) bounds the stream: decoding processes that
        read ahead into a pass nobody asks for hold batches they cannot hand over, and a
        blocked one delays the stream's close by grain's kill timeout."""
        own = len(self.dataset)
        if self.iterator is None and own:
            passes = self.dataset.repeat(max(1, passes_left))
            self.iterator = iterate(passes, self.workers, self.threads)
        try:
            for batch in range(self.batches):
                local = next(self.iterator) if batch < own else self.empty
                yield sharding.padded(local, self.local_batch)
        except BaseException:  # stopped mid-pass: the next pass must start at its start
            self.close()
            raise

    def close(self) -> None:
        if self.iterator is not None:
            close(self.iterator)
            self.iterator = None


# ------------------------------------------------- the training loop's input


class StreamInput(Input):
    """A grain stream read by `config.input_workers` processes, a batch per step."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, normalisation=None):
        self.config, self.mesh = config, mesh
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.train_records = records(config, config.train_split)
        if config.dataset == "image_folder":  # TFDS records were checked when prepared
            check_every_class_readable(self.train_records)
        eval_records = records(config, config.eval_split, self.train_records.class_names)
        sharding.check_batch_fits(config, len(self.train_records))
        self.steps_per_epoch = sharding.limited_steps(config, len(self.train_records))
        self.last_step = config.num_epochs * self.steps_per_epoch
        self.view = views.eval_view(config)
        self.info = stats.dataset_info(
            config,
            self.train_records.class_names,
            (len(self.train_records), len(eval_records)),
            self._sample_views,
            normalisation,
        )
        first = views.first_flip_only_epoch(config)
        self.dataset = train_dataset(
            self.train_records,
            seed=config.seed,
            local_batch=config.batch_size // self.process_count,
            image_size=config.image_size,
            augment=config.augment,
            process_index=self.process_index,
            process_count=self.process_count,
            crop_padding=config.crop_padding,
            flip_only_from_step=None if first is None else first * self.steps_per_epoch,
        )
        self.eval_passes = EvalPasses(
            eval_records,
            local_batch=(config.eval_batch_size or config.batch_size) // self.process_count,
            view=self.view,
            image_size=config.image_size,
            process_index=self.process_index,
            process_count=self.process_count,
            workers=config.input_workers,
            threads=config.input_threads,
        )
        # The step the training stream's first batch belongs to: grain's iterator state
        # counts batches from there.
        self.iterator, self.next_step, self.stream_start = None, 0, 0
        self.counts = dict.fromkeys(
            ("input_wait_seconds", "train_skipped_files", "test_skipped_files"), 0
        )

    def _sample_views(self, sample: np.ndarray) -> np.ndarray:
        """The readable evaluation views of this process's part of the stats sample."""
        mine = sample[sample % self.process_count == self.process_index]
        size = self.config.image_size
        batch = EvalBatch(self.train_records, self.view, size, "training").map(mine)
        return batch["image"][batch["mask"] > 0]

    def close(self) -> None:
        self._close_train_stream()
        self.eval_passes.close()

    def _close_train_stream(self) -> None:
        if self.iterator is not None:
            close(self.iterator)
            self.iterator = None

    def _to_devices(
        self, local: dict[str, np.ndarray], global_rows: int, skipped: str
    ) -> dict[str, jax.Array]:
        """A batch's arrays on the devices; its unreadable files counted in `skipped`."""
        self.counts[skipped] += int(local["skipped"].sum())
        arrays = {k: v for k, v in local.items() if k not in ("skipped", "index")}
        return sharding.to_devices(self.mesh, arrays, global_rows)

    def train_batches(self, epoch: int, start: int) -> Iterator[dict[str, jax.Array]]:
        step = epoch * self.steps_per_epoch + start
        if self.iterator is None or self.next_step != step:
            # A fresh stream positioned at `step` (batches are indexed by step) that ends
            # with the run's last step (see EvalPasses.one_pass for why).
            self._close_train_stream()
            self.iterator = iterate(
                self.dataset[step : self.last_step],
                self.config.input_workers,
                self.config.input_threads,
            )
            self.next_step = self.stream_start = step
        iterator = self.iterator
        for _ in range(start, self.steps_per_epoch):
            began = time.perf_counter()
            SUPERVISOR.check()
            batch = self._to_devices(next(iterator), self.config.batch_size, "train_skipped_files")
            self.counts["input_wait_seconds"] += time.perf_counter() - began
            self.next_step += 1
            yield batch

    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        global_rows = self.eval_passes.local_batch * self.process_count
        epoch = max(0, self.next_step // self.steps_per_epoch - 1)  # the one just trained
        for local in self.eval_passes.one_pass(self.config.num_epochs - epoch):
            yield self._to_devices(local, global_rows, "test_skipped_files")

    def checkpoint_items(self) -> dict[str, Any]:
        # A stream built at a later step has a state `restore` would read from step 0:
        # without it, the resumed stream is built at the step, which is as exact.
        if self.iterator is None or self.stream_start != 0:
            return {}
        return {"data": grain.checkpoint.CheckpointSave(self.iterator)}

    def restore(self, manager, step: int, saved_config: dict[str, Any]) -> None:
        """Positions the stream at `step`: with grain's saved iterator state where the
        worker count is the one it was saved with (another count would misread it), else
        by building the stream at `step` (batches are indexed by step) when it is read."""
        import orbax.checkpoint as ocp

        workers = self.config.input_workers
        if workers < 0 or saved_config.get("input_workers") != workers:
            logger.info("stream positioned at step %d (input_workers changed)", step)
            return
        if not os.path.isdir(os.path.join(str(manager.directory), str(step), "data")):
            logger.info("stream positioned at step %d (no stream state saved)", step)
            return
        iterator = iterate(self.dataset[: self.last_step], workers, self.config.input_threads)
        try:
            manager.restore(
                step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator))
            )
        except (ValueError, KeyError, IndexError, FileNotFoundError) as error:
            logger.info("stream position from the step (%s)", str(error).splitlines()[0][:120])
            close(iterator)
            return
        self._close_train_stream()
        self.iterator, self.next_step, self.stream_start = iterator, step, 0
