"""The interface training reads its data through, whichever input holds it."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from vgg_jax.data.info import DatasetInfo

if TYPE_CHECKING:
    import jax


class Input(abc.ABC):
    """What the training loop reads: batches are dicts of global arrays, 'image' uint8
    (B, H, W, 3) and 'label' int32 (B,), plus 'mask' float32 (B,) for evaluation (the
    last evaluation batch is padded with masked-out rows, never dropped). The device
    input and the stream subclass it."""

    info: DatasetInfo
    steps_per_epoch: int
    counts: dict[str, float]  # this epoch's: seconds waiting for input, unreadable files

    @abc.abstractmethod
    def train_batches(self, epoch: int, start: int) -> Iterator[dict[str, jax.Array]]:
        """The batches of `epoch`'s steps from `start` (a deterministic function of the
        seed and the step)."""

    @abc.abstractmethod
    def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
        """One pass over every evaluation example."""

    def checkpoint_items(self) -> dict[str, Any]:
        """Orbax items to save beside the model (the stream's position)."""
        return {}

    def restore(self, manager: Any, step: int, saved_config: dict[str, Any]) -> None:  # noqa: B027
        """Positions the input as saved with checkpoint `step` (whose run had the config
        `saved_config`, as JSON); by default the data order is a function of the seed."""

    def take_epoch_counts(self) -> dict[str, float]:
        """`counts`, then reset."""
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts

    def close(self) -> None:  # noqa: B027 (an optional hook, like restore)
        """Stops whatever the input started (worker processes)."""
