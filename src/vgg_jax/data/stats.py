"""The one input-normalisation policy, for both inputs (docs/data.md): per-channel mean
and standard deviation over the evaluation views of a fixed, seeded sample of the
training split. A sample, because a streamed split (ImageNet) cannot be read whole just
to normalise it; fixed (by record index), so that both inputs, on any number of
processes, store the same numbers. The sums are exact (integer pixel values in float64),
so the order in which processes add them does not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from vgg_jax.data.info import DatasetInfo, DatasetUnavailableError

SAMPLE_SIZE = 1024  # training images: the mean to within a fraction of a level


def channel_sums(images: np.ndarray) -> np.ndarray:
    """(3, channels): per-channel sum, sum of squares and count of the pixels."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
    return np.stack([pixels.sum(0), (pixels**2).sum(0), np.full(pixels.shape[1], len(pixels))])


def global_normalisation(local_sums: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (0..255 units) from every process's sums."""
    import jax

    sums = local_sums
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        sums = np.asarray(multihost_utils.process_allgather(local_sums)).sum(0)
    total, squares, count = sums
    if not count.all():
        raise DatasetUnavailableError("no readable training image in the normalisation sample")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


def dataset_info(
    config: ml_collections.ConfigDict,
    class_names: Sequence[str],
    num_examples: tuple[int, int],
    sample_views: Callable[[np.ndarray], np.ndarray],
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> DatasetInfo:
    """The info of a dataset of (train, eval) `num_examples`, normalised by `normalisation`
    (mean, std) where given, else measured: `sample_views(sorted indices)` gives this
    process's evaluation views (n may be 0) of its part of the sample's training images."""
    if normalisation is None:
        count = min(SAMPLE_SIZE, num_examples[0])
        sample = np.sort(np.random.default_rng(0).choice(num_examples[0], count, replace=False))
        normalisation = global_normalisation(channel_sums(sample_views(sample)))
    mean, std = normalisation
    return DatasetInfo(
        tuple(class_names), tuple(mean), tuple(std), config.image_size, *num_examples
    )
