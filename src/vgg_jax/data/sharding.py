"""What both inputs share: the mesh, the `Input` interface, and how host batches become
global device arrays (also for the evaluation CLI)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax.data.info import DatasetInfo

DATA_AXIS = "data"


def create_mesh() -> Mesh:
    """A one-axis mesh over every device of every process: pure data parallelism (auto
    axes: XLA propagates shardings from the inputs and the step's constraints)."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


class Input(Protocol):
    """What the training loop reads: batches are dicts of global arrays, 'image' uint8
    (B, H, W, 3) and 'label' int32 (B,), plus 'mask' float32 (B,) for evaluation (the
    last evaluation batch is padded with masked-out rows, never dropped). Both inputs
    subclass it for its defaults."""

    info: DatasetInfo
    steps_per_epoch: int
    counts: dict[str, float]  # this epoch's: seconds waiting for input, unreadable files

    def train_batches(self, epoch: int, start: int) -> Iterator[dict[str, jax.Array]]:
        """The batches of `epoch`'s steps from `start` (a deterministic function of the
        seed and the step)."""

    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        """One pass over every evaluation example."""

    def checkpoint_items(self) -> dict[str, Any]:
        """Orbax items to save beside the model (the stream's position)."""
        return {}

    def restore(self, manager: Any, step: int, saved_config: dict[str, Any]) -> None:
        """Positions the input as saved with checkpoint `step` (whose run had the config
        `saved_config`, as JSON); by default the data order is a function of the seed."""

    def take_epoch_counts(self) -> dict[str, float]:
        """`counts`, then reset."""
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts

    def close(self) -> None:
        """Stops whatever the input started (worker processes)."""


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
