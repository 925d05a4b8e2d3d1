"""Host uint8 splits -> device-resident, sharded arrays; per-epoch shuffle and
augmentation on the device; padded and masked evaluation batches.

Layout: a split lives on the devices once, its rows sharded over the mesh's `data`
axis. Each epoch one jitted call permutes it with a key derived from (seed, epoch),
augments it, and lays it out as (steps, global_batch, ...) with the batch axis
sharded, so step i's batch is `epoch[i]` and every device already holds its part.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax.configuration import DEVICE_AUGMENTATIONS
from vgg_jax.data_sources import Split

DATA_AXIS = "data"


def create_mesh() -> Mesh:
    """A one-axis mesh over every device of every process: pure data parallelism.

    Auto axes: XLA propagates shardings from the inputs and the constraints below."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation, in 0..255 units."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
    return tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist())


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
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    global_rows = rows * jax.process_count()

    def to_global(local: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(
            sharding, local[:rows], (global_rows, *local.shape[1:])
        )

    return DeviceSplit(to_global(split.images), to_global(split.labels))


def put_eval_batches(split: Split, global_batch_size: int, mesh: Mesh) -> dict[str, jax.Array]:
    """Every evaluation example as (steps, global_batch, ...) batches with a 0/1 mask:
    the last batch is padded, never dropped."""
    process_count = jax.process_count()
    local_batch = global_batch_size // process_count
    local_rows = -(-split.num_examples_global // process_count)  # the largest share
    steps = -(-local_rows // local_batch)
    padded = steps * local_batch

    def pad(array: np.ndarray) -> np.ndarray:
        widths = [(0, padded - len(array))] + [(0, 0)] * (array.ndim - 1)
        return np.pad(array, widths).reshape(steps, local_batch, *array.shape[1:])

    mask = np.zeros(padded, np.float32)
    mask[: len(split.labels)] = 1.0
    sharding = NamedSharding(mesh, P(None, DATA_AXIS))
    local = {"image": pad(split.images), "label": pad(split.labels), "mask": pad(mask)}
    return {
        name: jax.make_array_from_process_local_data(
            sharding, array, (steps, global_batch_size, *array.shape[2:])
        )
        for name, array in local.items()
    }


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
    jax.jit, static_argnames=("steps", "batch_size", "augment", "crop_padding", "mesh")
)
def _epoch_batches(images, labels, key, *, steps, batch_size, augment, crop_padding, mesh):
    order_key, augment_key = jax.random.split(key)
    order = jax.random.permutation(order_key, images.shape[0])[: steps * batch_size]
    images, labels = images[order], labels[order]
    if augment == "crop_flip":
        images = random_crop_flip(images, augment_key, crop_padding)
    images = images.reshape(steps, batch_size, *images.shape[1:])
    labels = labels.reshape(steps, batch_size)
    sharding = NamedSharding(mesh, P(None, DATA_AXIS))
    return {
        "image": jax.lax.with_sharding_constraint(images, sharding),
        "label": jax.lax.with_sharding_constraint(labels, sharding),
    }


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
    """One epoch's shuffled, augmented batches: {'image': (steps, B, H, W, 3) uint8,
    'label': (steps, B) int32}, batch axis sharded. Deterministic in `key`.
    `crop_padding`: crop_flip's zero padding on each side."""
    if augment not in DEVICE_AUGMENTATIONS:
        raise ValueError(f"augment {augment!r} is not one of {DEVICE_AUGMENTATIONS} on devices")
    return _epoch_batches(
        split.images,
        split.labels,
        key,
        steps=steps,
        batch_size=batch_size,
        augment=augment,
        crop_padding=crop_padding,
        mesh=mesh,
    )
