"""Everything between image files and the devices (the modules: docs/architecture.md).
Training reads either input, device-resident or streamed, through `Input`."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import ml_collections
import numpy as np
from jax import Array
from jax.sharding import Mesh

from vgg_jax.configuration import DEVICE_AUGMENTATIONS
from vgg_jax.data.info import DatasetInfo, DatasetUnavailableError
from vgg_jax.data.sharding import DATA_AXIS, create_mesh

__all__ = [
    "DATA_AXIS",
    "DatasetInfo",
    "DatasetUnavailableError",
    "Input",
    "choose",
    "create",
    "create_mesh",
    "evaluation_batches",
]

logger = logging.getLogger(__name__)


class Input(Protocol):
    """What the training loop reads: batches are dicts of global arrays, 'image' uint8
    (B, H, W, 3) and 'label' int32 (B,), plus 'mask' float32 (B,) for evaluation (the
    last evaluation batch is padded with masked-out rows, never dropped)."""

    info: DatasetInfo
    steps_per_epoch: int

    def train_batches(self, epoch: int, start: int) -> Iterator[dict[str, Array]]:
        """The batches of `epoch`'s steps from `start` (a deterministic function of the
        seed and the step)."""

    def eval_batches(self) -> Iterator[dict[str, Array]]:
        """One pass over every evaluation example."""

    def checkpoint_items(self) -> dict[str, Any]:
        """Orbax items to save beside the model (the stream's position)."""

    def restore(self, manager: Any, step: int, saved_config: dict[str, Any]) -> None:
        """Positions the input as saved with checkpoint `step` (whose run had the config
        `saved_config`, as JSON)."""

    def take_epoch_counts(self) -> dict[str, float]:
        """Per-epoch counts (seconds waiting for input, unreadable files), then reset."""

    def close(self) -> None:
        """Stops whatever the input started (worker processes)."""


def train_split_bytes(config: ml_collections.ConfigDict) -> int | None:
    """The training split's size as uint8 images, where known without reading it."""
    per_image = config.image_size * config.image_size * 3
    if config.dataset == "synthetic":
        return config.synthetic_train_size * per_image
    if config.dataset == "image_folder":
        from vgg_jax.data import sources

        files, _ = sources.list_image_folder(
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


def create(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Input:
    """The input `config` asks for. `normalisation`: (mean, std) to use instead of the
    training data's own (a resumed run's stored one, or pretrained weights' own)."""
    kind, why = choose(config)
    logger.info("input: %s (%s)", kind, why)
    if kind == "device":
        from vgg_jax.data.device import DeviceInput

        return DeviceInput(config, mesh, normalisation)
    from vgg_jax.data.stream import StreamInput  # grain: only a streamed run loads it

    return StreamInput(config, mesh, normalisation)


def evaluation_batches(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    batch_size: int,
    class_names: Sequence[str],
    data_dir: str | None = None,
    counts: dict[str, int] | None = None,
) -> Iterator[dict[str, Array]]:
    """The evaluation split of `config` streamed through its evaluation view, a padded,
    masked batch at a time (host memory bounded whatever the split's size), for one
    process. Unreadable images are masked out, warned about and counted in
    `counts['test_skipped_files']`."""
    from vgg_jax.data import sharding, sources, views

    source = sources.open_split(config, config.eval_split, class_names, data_dir)
    view, size = views.eval_view(config), config.image_size
    chunk = -(-batch_size // views.DECODE_THREADS)
    reader = source.read(0, source.size)

    def view_part(start: int, elements: list) -> tuple[dict, list[str]]:
        return views.eval_batch(elements, view, size, lambda row: source.name(start + row))

    with ThreadPoolExecutor(views.DECODE_THREADS) as pool:
        for start in range(0, source.size, batch_size):
            elements = list(itertools.islice(reader, batch_size))
            offsets = range(0, len(elements), chunk)
            firsts = [start + offset for offset in offsets]
            pieces = [elements[offset : offset + chunk] for offset in offsets]
            parts = list(pool.map(view_part, firsts, pieces))
            host = {name: np.concatenate([p[0][name] for p in parts]) for name in parts[0][0]}
            problems = [problem for part in parts for problem in part[1]]
            for problem in problems:
                logger.warning("unreadable evaluation image %s", problem)
            if counts is not None:
                counts["test_skipped_files"] = counts.get("test_skipped_files", 0) + len(problems)
            yield sharding.to_devices(mesh, sharding.padded(host, batch_size), batch_size)
