import time

import numpy as np
import pytest
from conftest import load_split
from PIL import Image

from vgg_jax.data import sources, views
from vgg_jax.data.info import DatasetUnavailableError


def test_process_ranges_cover_the_split_without_overlap():
    ranges = [sources.process_range(10, i, 3) for i in range(3)]
    assert ranges == [(0, 4), (4, 8), (8, 10)]


def test_image_folder_reads_classes_in_name_order_and_resizes(image_folder):
    split = load_split("image_folder", "train", data_dir=str(image_folder), image_size=16)
    assert split.class_names == ("cat", "dog", "frog")
    assert split.images.shape == (24, 16, 16, 3) and split.images.dtype == np.uint8
    # Class k is dominated by colour channel k (RGB order, not BGR).
    dominant = split.images.reshape(24, -1, 3).mean(1).argmax(1)
    np.testing.assert_array_equal(dominant, split.labels)


def test_image_folder_share_of_the_second_of_two_processes(image_folder):
    split = load_split(
        "image_folder",
        "test",
        data_dir=str(image_folder),
        image_size=8,
        process_index=1,
        process_count=2,
    )
    assert split.num_examples_global == 9 and len(split.labels) == 4


def test_missing_image_folder_says_what_layout_is_expected(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="train"):
        load_split("image_folder", "train", data_dir=str(tmp_path), image_size=8)


@pytest.mark.parametrize(
    "mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"], ids=lambda mode: mode.replace(";", "")
)
def test_any_image_mode_becomes_rgb_uint8(mode):
    if mode == "I;16":
        image = Image.fromarray(np.full((5, 7), 40000, np.uint16))
    else:
        image = Image.new(mode, (7, 5))
    array = views.squash(views.decode(image), 4)
    assert array.shape == (4, 4, 3) and array.dtype == np.uint8
    if mode == "I;16":
        assert array.min() == round(40000 / 65535 * 255)


def test_synthetic_data_is_deterministic_and_balanced_enough():
    a = load_split("synthetic", "train", data_dir=None, image_size=16)
    b = load_split("synthetic", "train", data_dir=None, image_size=16)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.shape == (2048, 16, 16, 3)
    assert np.bincount(a.labels, minlength=10).min() > 150


def test_tfds_without_network_fails_fast_and_says_where_the_tarball_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "network_available", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as error:
        load_split("cifar10", "train", data_dir=str(tmp_path), image_size=32)
    assert time.perf_counter() - start < 30
    message = str(error.value)
    assert "cifar-10-binary.tar.gz" in message
    assert str(tmp_path / "downloads" / "manual") in message
    assert "\n" not in message


def test_tfds_under_mock_data_gives_uint8_images_and_names(monkeypatch):
    import tensorflow_datasets as tfds

    # mock_data fakes the download too; never let the test touch the network.
    monkeypatch.setattr(sources, "network_available", lambda *a, **k: True)

    with tfds.testing.mock_data(num_examples=20):
        split = load_split("cifar10", "test", data_dir=None, image_size=32)
    assert split.images.shape == (20, 32, 32, 3) and split.images.dtype == np.uint8
    assert len(split.class_names) == 10 and split.num_examples_global == 20


def test_a_fifo_named_like_an_image_is_skipped_not_read(image_folder, caplog):
    # Reading a FIFO blocks until something writes to it: forever, here.
    import logging
    import os

    from vgg_jax import inference

    fifo = image_folder / "train" / "cat" / "pipe.jpg"
    os.mkfifo(fifo)
    with caplog.at_level(logging.WARNING, logger="vgg_jax"):
        split = load_split("image_folder", "train", data_dir=str(image_folder), image_size=8)
    assert len(split.labels) == 24 and [os.path.basename(p) for p in split.skipped] == ["pipe.jpg"]
    assert any("pipe.jpg" in r.getMessage() and "regular" in r.getMessage() for r in caplog.records)
    with pytest.raises(inference.ImageError, match="pipe.jpg: not a regular file"):
        inference.read_image(fifo)
