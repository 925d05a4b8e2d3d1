"""Everything between image files and the devices (the modules: docs/architecture.md).
Training reads either input, device-resident or streamed, through `Input`."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import ml_collections
from jax import Array
from jax.sharding import Mesh

from vgg_jax.configuration import DEVICE_AUGMENTATIONS
from vgg_jax.data.info import DatasetInfo, DatasetUnavailableError
from vgg_jax.data.interface import Input
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


def choose(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """'device' or 'stream', and why (the log says it)."""
    if config.input != "auto":
        return config.input, "config.input"
    if config.augment not in DEVICE_AUGMENTATIONS:
        return "stream", f"augment={config.augment!r} runs on the host"
    if config.dataset == "synthetic":
        examples = config.synthetic_train_size
    elif config.dataset == "image_folder":
        from vgg_jax.data import sources

        examples = len(sources.list_image_folder(config.data_dir, config.train_split)[0])
    else:
        return "device", "a TFDS dataset: device-resident unless config.input='stream'"
    size = examples * config.image_size * config.image_size * 3  # bytes as uint8
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
    """The evaluation split of `config` through its evaluation view, a padded, masked batch
    at a time (bounded host memory), for one process. Unreadable images are masked out,
    warned about and counted in `counts['test_skipped_files']`."""
    from vgg_jax.data import sharding, sources, views

    source = sources.open_split(config, config.eval_split, class_names, data_dir)
    view, reader = views.eval_view(config), source.read(0, source.size)
    with ThreadPoolExecutor(views.DECODE_THREADS) as pool:
        for start in range(0, source.size, batch_size):
            elements = list(itertools.islice(reader, batch_size))

            def name(row: int, first: int = start) -> str:
                return source.name(first + row)

            host, problems = views.eval_batch(elements, view, config.image_size, name, pool.map)
            for problem in problems:
                logger.warning("unreadable evaluation image %s", problem)
            if counts is not None:
                counts["test_skipped_files"] = counts.get("test_skipped_files", 0) + len(problems)
            yield sharding.to_devices(mesh, sharding.padded(host, batch_size), batch_size)
