"""The mesh, and how host batches become global device arrays (for both inputs and the
evaluation CLI)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def create_mesh() -> Mesh:
    """A one-axis mesh over every device of every process: pure data parallelism (auto
    axes: XLA propagates shardings from the inputs and the step's constraints)."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def check_batch_fits(config: ml_collections.ConfigDict, num_examples: int) -> None:
    if num_examples < config.batch_size:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the training split "
            f"({num_examples} examples)"
        )


def limited_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """Training steps per epoch: the full batches (the remainder is left for the next
    shuffle), capped by `max_steps_per_epoch`."""
    steps = max(1, num_examples // config.batch_size)
    return min(steps, config.max_steps_per_epoch or steps)


def to_devices(
    mesh: Mesh, local: dict[str, np.ndarray], global_rows: int, axis: int = 0
) -> dict[str, jax.Array]:
    """This process's rows (along `axis`) of a batch -> global arrays, rows sharded over
    the mesh."""
    sharding = NamedSharding(mesh, P(*[None] * axis, DATA_AXIS))
    return {
        name: jax.make_array_from_process_local_data(
            sharding, array, (*array.shape[:axis], global_rows, *array.shape[axis + 1 :])
        )
        for name, array in local.items()
    }


def padded(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """A (possibly partial) evaluation batch padded with zeros to `rows` rows: mask 0."""
    have = len(batch["label"])
    if have == rows:
        return batch
    return {
        name: np.concatenate([array, np.zeros((rows - have, *array.shape[1:]), array.dtype)])
        for name, array in batch.items()
    }
