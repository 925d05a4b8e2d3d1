"""The one input-normalisation policy, for both inputs: per-channel mean and standard
deviation over the evaluation views of a fixed, seeded sample of the training split.

A sample, because a streamed split (ImageNet) cannot be read whole just to normalise it;
fixed (seed 0, by record index), so the device input and the stream, on any number of
processes, pick the same images, view them the same way (`views.eval_view`) and store
the same numbers. The sums are exact (integer pixel values in float64), so the order in
which processes add them does not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from vgg_jax.data.info import DatasetInfo, DatasetUnavailableError

SAMPLE_SIZE = 1024  # training images: the mean to within a fraction of a level


def sample_indices(num_examples: int, count: int = SAMPLE_SIZE) -> np.ndarray:
    """The sorted record indices of the training images the statistics are taken over."""
    chosen = np.random.default_rng(0).choice(num_examples, min(count, num_examples), replace=False)
    return np.sort(chosen)


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
    """The info of a dataset of (train, eval) `num_examples`. Its normalisation is
    `normalisation` (mean, std) where given, else measured: `sample_views(indices)` gives
    this process's evaluation views (uint8 (n, H, W, 3), n may be 0) of its part of the
    sample's training images."""
    if normalisation is None:
        local = sample_views(sample_indices(num_examples[0]))
        normalisation = global_normalisation(channel_sums(local))
    mean, std = normalisation
    return DatasetInfo(
        tuple(class_names), tuple(mean), tuple(std), config.image_size, *num_examples
    )
