import jax
import numpy as np
import pytest

from vgg_jax.data import create_mesh, device, stats
from vgg_jax.data.sources import Split


def _split(count, size=8):
    images = np.arange(count, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, size, size, 3), np.uint8
    )
    return Split(images, np.arange(count, dtype=np.int32), ("a", "b"), count)


def test_eval_batches_cover_every_example_once_with_a_mask():
    mesh = create_mesh()
    batches = device.put_eval_batches(_split(37), 16, mesh)
    assert batches["image"].shape == (3, 16, 8, 8, 3)
    mask = np.asarray(batches["mask"]).reshape(-1)
    labels = np.asarray(batches["label"]).reshape(-1)
    assert mask.sum() == 37
    assert sorted(labels[mask == 1].tolist()) == list(range(37))
    assert batches["image"].sharding.spec == jax.sharding.PartitionSpec(None, "data")


def test_epoch_is_a_deterministic_permutation_sharded_over_devices():
    mesh = create_mesh()
    data = device.put_train_split(_split(64), mesh)
    key = jax.random.key(7)
    epoch = device.epoch_batches(data, key, steps=4, batch_size=16, augment="none", mesh=mesh)
    labels = np.asarray(epoch["label"])
    assert sorted(labels.reshape(-1).tolist()) == list(range(64))
    # Images travel with their labels.
    np.testing.assert_array_equal(np.asarray(epoch["image"])[:, :, 0, 0, 0], labels)
    again = device.epoch_batches(data, key, steps=4, batch_size=16, augment="none", mesh=mesh)
    np.testing.assert_array_equal(labels, np.asarray(again["label"]))
    other = device.epoch_batches(
        data, jax.random.key(8), steps=4, batch_size=16, augment="none", mesh=mesh
    )
    assert not np.array_equal(labels, np.asarray(other["label"]))
    assert len(epoch["image"].sharding.device_set) == jax.device_count()


def test_epoch_order_does_not_depend_on_the_device_count():
    split = _split(64)
    key = jax.random.key(3)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        data = device.put_train_split(split, mesh)
        epoch = device.epoch_batches(
            data, key, steps=4, batch_size=16, augment="crop_flip", mesh=mesh
        )
        results.append(jax.device_get(epoch))
    np.testing.assert_array_equal(results[0]["label"], results[1]["label"])
    np.testing.assert_array_equal(results[0]["image"], results[1]["image"])


def test_crop_flip_returns_windows_of_the_padded_image():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (32, 8, 8, 3), dtype=np.uint8)
    out = np.asarray(device.random_crop_flip(images, jax.random.key(0), padding=2))
    assert out.shape == images.shape
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    flipped_some = changed_some = False
    for original, crop in zip(padded, out, strict=True):
        windows = [
            candidate
            for dy in range(5)
            for dx in range(5)
            for candidate in (original[dy : dy + 8, dx : dx + 8],)
        ]
        plain = any(np.array_equal(crop, w) for w in windows)
        flipped = any(np.array_equal(crop, w[:, ::-1]) for w in windows)
        assert plain or flipped
        flipped_some |= flipped and not plain
        changed_some |= not np.array_equal(crop, original[2:10, 2:10])
    assert flipped_some and changed_some


def test_crop_padding_sets_how_far_the_device_crop_moves():
    # A bright top-left pixel in every image: where it lands (mirrored by a flip) is the
    # crop's offset.
    images = np.full((64, 8, 8, 3), 7, np.uint8)
    images[:, 0, 0] = 255
    mesh = create_mesh()
    data = device.put_train_split(Split(images, np.zeros(64, np.int32), ("a",), 64), mesh)
    for padding in (0, 1):
        epoch = device.epoch_batches(
            data,
            jax.random.key(0),
            steps=4,
            batch_size=16,
            augment="crop_flip",
            mesh=mesh,
            crop_padding=padding,
        )
        _, rows, cols = np.nonzero(np.asarray(epoch["image"]).reshape(64, 8, 8, 3)[..., 0] == 255)
        cols = np.minimum(cols, 7 - cols)
        if padding == 0:
            assert len(rows) == 64 and rows.max() == cols.max() == 0  # flips only
        else:
            assert rows.max() == cols.max() == padding  # moved, by at most the padding


def test_unknown_augmentation_is_named():
    mesh = create_mesh()
    data = device.put_train_split(_split(16), mesh)
    with pytest.raises(ValueError, match="mixup"):
        device.epoch_batches(
            data, jax.random.key(0), steps=1, batch_size=8, augment="mixup", mesh=mesh
        )


def test_channel_stats_are_in_pixel_units():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[1] = 200
    mean, std = stats.global_normalisation(stats.channel_sums(images))
    assert mean == pytest.approx((100.0,) * 3)
    assert std == pytest.approx((100.0,) * 3)
