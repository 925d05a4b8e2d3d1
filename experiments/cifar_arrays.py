"""CIFAR-10 stored as JPEG (the `cifar10-jpeg.npz` archive) decoded into uint8 arrays, for
the peers that train on the same data as ours: the PyTorch twin (experiments/torch_twin_training.py)
and airbench (experiments/airbench_cifar.py).

The archive holds, per split, the JPEG files' bytes concatenated (`{split}_jpeg`), their
offsets (`{split}_offsets`, one more than the images) and labels (`{split}_label`), and
the class names (`label_names`). Decoding goes through `data.views.decode`, the decoder
our own input uses, so every trainer sees the same pixels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vgg_jax.data import views

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class CifarArrays:
    """Both splits decoded: images uint8 (N, H, W, 3), labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def _decode_split(archive: np.lib.npyio.NpzFile, split: str) -> tuple[np.ndarray, np.ndarray]:
    data, offsets = archive[f"{split}_jpeg"], archive[f"{split}_offsets"]
    labels = archive[f"{split}_label"].astype(np.int64)
    if len(offsets) != len(labels) + 1:
        raise ValueError(
            f"{split}: {len(offsets)} offsets for {len(labels)} labels (expected one more)"
        )
    images = [views.decode(data[offsets[i] : offsets[i + 1]].tobytes()) for i in range(len(labels))]
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"{split}: the images differ in size")
    return np.stack(images), labels


def load(path: str | Path) -> CifarArrays:
    """A JPEG archive (decoded here) or a file that `save` wrote."""
    with np.load(path) as archive:
        if "train_jpeg" in archive.files:
            train, test = (_decode_split(archive, split) for split in SPLITS)
            classes = tuple(str(name) for name in archive["label_names"])
            return CifarArrays(*train, *test, classes)
        return CifarArrays(
            *(archive[f"{split}_{part}"] for split in SPLITS for part in ("images", "labels")),
            classes=tuple(str(name) for name in archive["classes"]),
        )


def save(arrays: CifarArrays, path: str | Path) -> None:
    """The decoded arrays, uncompressed (a few seconds of decoding saved per reader)."""
    np.savez(
        path,
        **{
            f"{split}_{part}": getattr(arrays, f"{split}_{part}")
            for split in SPLITS
            for part in ("images", "labels")
        },
        classes=np.asarray(arrays.classes),
    )
