"""The PyTorch twin's training loop (experiments/torch_twin_training.py): the same augmentation,
optimiser and schedule as ours, and a tiny run end to end on the CPU."""

import json
import sys

import numpy as np
import pytest
from conftest import CONFIGS, REPO

torch = pytest.importorskip("torch")
sys.path.insert(0, str(REPO / "experiments"))

import cifar_arrays  # noqa: E402
import torch_twin_training  # noqa: E402

from vgg_jax import configuration, optim  # noqa: E402


def fast_config(**overrides):
    config = configuration.load_config_file(CONFIGS / "vgg16_fast.py")
    for name, value in overrides.items():
        config[name] = value
    return config


def tiny_arrays(train=48, test=20, size=16, seed=0):
    rng = np.random.default_rng(seed)

    def split(count):
        labels = rng.integers(0, 3, count)
        images = rng.integers(0, 90, (count, size, size, 3)).astype(np.uint8)
        images[np.arange(count), :, :, labels] += 160  # the class is the dominant colour
        return images, labels.astype(np.int64)

    return cifar_arrays.CifarArrays(*split(train), *split(test), ("r", "g", "b"))


@pytest.mark.parametrize("padding", [0, 2])
def test_crop_flip_takes_a_window_of_the_padded_image_or_its_mirror(padding):
    images = torch.from_numpy(np.random.default_rng(1).integers(1, 256, (64, 6, 5, 3))).to(
        torch.uint8
    )
    out = torch_twin_training.crop_flip(images, padding, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = np.pad(images.numpy(), ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
    flipped = 0
    for index in range(len(images)):
        windows = [
            padded[index, y : y + 6, x : x + 5]
            for y in range(2 * padding + 1)
            for x in range(2 * padding + 1)
        ]
        got = out[index].numpy()
        plain = any(np.array_equal(got, w) for w in windows)
        mirror = any(np.array_equal(got[:, ::-1], w) for w in windows)
        assert plain or mirror
        flipped += mirror and not plain
    assert 10 < flipped < 54  # about half of 64 flipped (binomial, p = 0.5)


def test_learning_rates_are_the_schedule_ours_steps_with():
    config = fast_config(num_epochs=3, warmup_epochs=1.0)
    rates = torch_twin_training.learning_rates(config, steps_per_epoch=5)
    schedule = optim.create_learning_rate_schedule(config, 5)
    assert rates.shape == (15,)
    np.testing.assert_allclose(rates, [float(schedule(step)) for step in range(15)], rtol=1e-6)
    assert rates[0] == 0.0 and rates.argmax() == 5  # warm-up to the peak, then down


def test_twin_optimiser_matches_optax_nesterov_with_coupled_l2():
    """torch SGD(momentum, nesterov, weight_decay) against optim.create_optimizer on the
    same parameters, gradients and rates, in float64: the same update rule."""
    import jax

    config = fast_config(momentum=0.9, nesterov=True, l2=5e-4)
    rng = np.random.default_rng(2)
    start = rng.normal(size=7)
    grads = rng.normal(size=(4, 7))
    rates = [0.1, 0.3, 0.2, 0.05]
    with jax.enable_x64(True):
        import jax.numpy as jnp

        transform = optim.create_optimizer(config, lambda step: jnp.asarray(rates)[step])
        params = jnp.asarray(start)
        state = transform.init(params)
        for grad in grads:
            updates, state = transform.update(jnp.asarray(grad), state, params)
            params = params + updates
        ours = np.asarray(params)
    weight = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    sgd = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for grad, rate in zip(grads, rates, strict=True):
        sgd.param_groups[0]["lr"] = rate
        weight.grad = torch.tensor(grad, dtype=torch.float64)
        sgd.step()
    np.testing.assert_allclose(weight.detach().numpy(), ours, rtol=1e-12, atol=1e-14)


def test_tiny_twin_trains_and_writes_a_record_per_epoch(tmp_path):
    config = fast_config(
        model="vgg_tiny", width=0.5, image_size=16, batch_size=8, num_epochs=3,
        max_steps_per_epoch=4, dtype="float32", learning_rate=0.05, flip_only_last_epochs=1,
    )  # fmt: skip
    metrics = tmp_path / "twin.jsonl"
    records = torch_twin_training.train(config, tiny_arrays(), metrics, compile_model=False)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [4, 8, 12]
    written = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert written == records
    for record in records:
        assert np.isfinite(record["train_loss"])
        for key in ("train_accuracy", "test_accuracy", "test_accuracy_flip_tta"):
            assert 0.0 <= record[key] <= 1.0
    schedule = optim.create_learning_rate_schedule(config, 4)
    assert records[-1]["learning_rate"] == pytest.approx(float(schedule(11)))  # the last step's
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns (fixed seeds)


def test_twin_refuses_what_it_does_not_implement():
    config = fast_config(ema_decay=0.99, weight_decay=1e-4)
    with pytest.raises(ValueError, match="ema_decay=0.99, weight_decay=0.0001"):
        torch_twin_training.train(config, tiny_arrays(), compile_model=False)


def test_jpeg_archive_decodes_to_the_pixels_our_input_reads(tmp_path):
    from test_gpu_session import write_archive

    from vgg_jax.data import views

    write_archive(tmp_path / "tiny.npz", per_class=(2, 1))
    arrays = cifar_arrays.load(tmp_path / "tiny.npz")
    assert arrays.train_images.shape == (6, 32, 32, 3) and arrays.test_images.shape[0] == 3
    assert arrays.train_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert arrays.classes == ("airplane", "automobile", "bird")
    with np.load(tmp_path / "tiny.npz") as archive:
        first = archive["train_jpeg"][: archive["train_offsets"][1]].tobytes()
    np.testing.assert_array_equal(arrays.train_images[0], views.decode(first))
    assert arrays.train_images[0][..., 0].mean() > 150  # class 0's colour: decoded, in RGB


def test_arrays_round_trip_and_airbench_files(tmp_path):
    from test_experiments import load_script

    arrays = tiny_arrays(train=6, test=4, size=32)
    cifar_arrays.save(arrays, tmp_path / "arrays.npz")
    loaded = cifar_arrays.load(tmp_path / "arrays.npz")
    np.testing.assert_array_equal(loaded.train_images, arrays.train_images)
    np.testing.assert_array_equal(loaded.test_labels, arrays.test_labels)
    assert loaded.classes == arrays.classes
    airbench = load_script("airbench_cifar")
    train_pt, test_pt = airbench.write_airbench_files(arrays, tmp_path / "cifar10")
    assert airbench.check_airbench_file(train_pt) == {"images": [6, 32, 32, 3], "classes": 3}
    data = torch.load(test_pt, weights_only=True)
    np.testing.assert_array_equal(data["images"].numpy(), arrays.test_images)
    assert data["labels"].dtype == torch.int64 and data["classes"] == ["r", "g", "b"]
    torch.save({**data, "images": data["images"].float()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not uint8"):
        airbench.check_airbench_file(tmp_path / "bad.pt")
