"""Splits that fit, resident on the devices, rows sharded over the mesh's `data` axis.
Each epoch one jitted call permutes, augments and lays out a split as (steps,
global_batch, ...): step i's batch is `epoch[i]`, already where it is needed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax.configuration import DEVICE_AUGMENTATIONS
from vgg_jax.data import sharding, sources, stats, views
from vgg_jax.data.interface import Input
from vgg_jax.data.sources import Split


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A split resident on the devices, rows sharded along the data axis."""

    images: jax.Array  # uint8 (N, H, W, 3)
    labels: jax.Array  # int32 (N,)

    @property
    def num_examples(self) -> int:
        return self.images.shape[0]


def put_train_split(split: Split, mesh: Mesh) -> DeviceSplit:
    """Places the training rows on the mesh. Each process contributes an equal number of
    rows, a multiple of its device count: the fewest any process has (unreadable files
    leave some with fewer); the few rows beyond that are left out."""
    local_devices = jax.local_device_count()
    rows = len(split.labels) // local_devices * local_devices
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rows = int(np.min(multihost_utils.process_allgather(np.asarray(rows))))
    if rows == 0:
        raise ValueError(
            f"the training split has {split.num_examples_global} examples, fewer than the "
            f"{jax.device_count()} devices"
        )
    local = {"images": split.images[:rows], "labels": split.labels[:rows]}
    return DeviceSplit(**sharding.to_devices(mesh, local, rows * jax.process_count()))


def put_eval_batches(split: Split, global_batch_size: int, mesh: Mesh) -> dict[str, jax.Array]:
    """Every evaluation example as (steps, global_batch, ...) batches with a 0/1 mask:
    the last batch is padded, never dropped."""
    process_count = jax.process_count()
    local_batch = global_batch_size // process_count
    local_rows = -(-split.num_examples_global // process_count)  # the largest share
    steps = -(-local_rows // local_batch)
    mask = np.ones(len(split.labels), np.float32)
    rows = {"image": split.images, "label": split.labels, "mask": mask}
    local = {
        name: array.reshape(steps, local_batch, *array.shape[1:])
        for name, array in sharding.padded(rows, steps * local_batch).items()
    }
    return sharding.to_devices(mesh, local, global_batch_size, axis=1)


def random_crop_flip(images: jax.Array, key: jax.Array, padding: int = 4) -> jax.Array:
    """Pads each image by `padding` zero pixels, crops a random window of the original
    size, and flips half of the images left-right (the standard CIFAR augmentation)."""
    count, height, width, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (count, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (count,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop(image, offset):
        return jax.lax.dynamic_slice(
            image, (offset[0], offset[1], 0), (height, width, image.shape[-1])
        )

    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)


@functools.partial(
    jax.jit, static_argnames=("steps", "batch_size", "augment", "mesh", "crop_padding")
)
def epoch_batches(
    split: DeviceSplit,
    key: jax.Array,
    *,
    steps: int,
    batch_size: int,
    augment: str,
    mesh: Mesh,
    crop_padding: int = 4,
) -> dict[str, jax.Array]:
    """One epoch's shuffled, augmented batches, deterministic in `key`: {'image': (steps,
    B, H, W, 3) uint8, 'label': (steps, B) int32}, batch axis sharded."""
    if augment not in DEVICE_AUGMENTATIONS:
        raise ValueError(f"augment {augment!r} is not one of {DEVICE_AUGMENTATIONS} on devices")
    order_key, augment_key = jax.random.split(key)
    order = jax.random.permutation(order_key, split.num_examples)[: steps * batch_size]
    images, labels = split.images[order], split.labels[order]
    if augment == "crop_flip":
        images = random_crop_flip(images, augment_key, crop_padding)
    batches = {
        "image": images.reshape(steps, batch_size, *images.shape[1:]),
        "label": labels.reshape(steps, batch_size),
    }
    return jax.lax.with_sharding_constraint(
        batches, NamedSharding(mesh, P(None, sharding.DATA_AXIS))
    )


@jax.jit
def _take(batches: dict[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
    return jax.tree.map(lambda array: array[index], batches)


class DeviceInput(Input):
    """Both splits on the devices once; each epoch permuted and augmented by one jit."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, normalisation=None):
        self.config, self.mesh = config, mesh
        # Both splits of this process as evaluation views, in host memory.
        view = views.eval_view(config)
        index, count = jax.process_index(), jax.process_count()
        train_source = sources.open_split(config, config.train_split)
        eval_source = sources.open_split(config, config.eval_split, train_source.class_names)
        train_split = sources.load_split(train_source, view, index, count)
        eval_split = sources.load_split(eval_source, view, index, count)
        self.info = stats.dataset_info(
            config,
            train_source.class_names,
            (train_source.size, eval_source.size),
            lambda sample: train_split.images[np.isin(train_split.indices, sample)],
            normalisation,
        )
        sharding.check_batch_fits(config, train_split.num_examples_global)
        self.train_data = put_train_split(train_split, mesh)
        eval_batch_size = config.eval_batch_size or config.batch_size
        self.eval_data = put_eval_batches(eval_split, eval_batch_size, mesh)
        self.steps_per_epoch = sharding.limited_steps(config, self.train_data.num_examples)
        self.data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
        self.counts = {"input_wait_seconds": 0.0}

    def train_batches(self, epoch: int, start: int) -> Iterator[dict[str, jax.Array]]:
        began = time.perf_counter()
        batches = epoch_batches(
            self.train_data,
            jax.random.fold_in(self.data_key, epoch),
            steps=self.steps_per_epoch,
            batch_size=self.config.batch_size,
            augment=self.config.augment,
            mesh=self.mesh,
            crop_padding=views.crop_padding(self.config, epoch),
        )
        self.counts["input_wait_seconds"] += time.perf_counter() - began
        for index in range(start, self.steps_per_epoch):
            yield _take(batches, np.int32(index))

    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        for index in range(self.eval_data["label"].shape[0]):
            yield _take(self.eval_data, np.int32(index))
