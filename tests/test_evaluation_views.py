"""One truth about evaluation: what training's log reports is what `python -m
vgg_jax.evaluate` and `vgg_jax.load(...).predict` compute, for every augmentation family
and both inputs; the same normalisation from either input; evaluation streamed in
bounded memory."""

import json
import sys

import numpy as np
import pytest
from conftest import run_cli, write_image_folder

import vgg_jax
from vgg_jax import data, train
from vgg_jax.metrics_log import read_metrics

CLASSES = ("a", "b", "c")


def _folder(root, per_class=(16, 20), size=(36, 60), seed=0):
    """Images wider than tall, each a noisy field of one class's colour with a patch of
    another's near one side: a squashed view and a centre crop of it differ."""

    def draw(rng, label, size):
        pixels = rng.integers(0, 90, (*size, 3), dtype=np.uint8)
        pixels[..., label] += 150
        left = int(rng.integers(0, size[1] // 4))
        pixels[:, left : left + size[1] // 5, (label + 1) % 3] = 250
        return pixels

    return write_image_folder(root, CLASSES, per_class, size, seed=seed, draw=draw)


def _config(tiny_config, root, augment, input_kind):
    config = tiny_config
    config.dataset, config.data_dir, config.image_size = "image_folder", str(root), 16
    config.augment, config.input, config.input_workers = augment, input_kind, 0
    config.batch_size, config.num_epochs, config.learning_rate = 8, 1, 0.05
    return config


def _correct_by_predict(workdir, root) -> int:
    model = vgg_jax.load(workdir)
    correct = 0
    for label, name in enumerate(CLASSES):
        files = sorted((root / "test" / name).iterdir())
        probabilities = model.predict(files)
        correct += int((probabilities.argmax(-1) == label).sum())
    return correct


@pytest.mark.slow
@pytest.mark.parametrize(
    ("augment", "input_kind"),
    [("random_resized_crop", "stream"), ("crop_flip", "device"), ("crop_flip", "stream")],
)
def test_evaluate_and_predict_count_what_training_logged(
    tiny_config, tmp_path, augment, input_kind
):
    root = _folder(tmp_path / "data")
    config = _config(tiny_config, root, augment, input_kind)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    logged = read_metrics(workdir)[-1]
    total = len(CLASSES) * 20
    logged_correct = round(logged["test_accuracy"] * total)

    result = run_cli("vgg_jax.evaluate", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    # Float reduction order differs between the runs (devices, batch layout): a
    # prediction on a near-tie may flip, at most one image here.
    assert abs(round(evaluated["test_accuracy"] * total) - logged_correct) <= 1
    assert evaluated["test_loss"] == pytest.approx(logged["test_loss"], rel=1e-4)
    assert abs(_correct_by_predict(workdir, root) - logged_correct) <= 1


def test_both_inputs_store_the_same_normalisation(tiny_config, tmp_path):
    root = _folder(tmp_path / "data", per_class=(30, 2))
    infos = []
    for input_kind in ("device", "stream"):
        config = _config(tiny_config.copy_and_resolve_references(), root, "crop_flip", input_kind)
        batches = data.create(config, data.create_mesh())
        infos.append(batches.info)
        batches.close()
    assert infos[0].mean == infos[1].mean and infos[0].std == infos[1].std
    # Over real pixels: the class colours lift every channel's mean well above the noise's.
    assert all(60 < m < 200 for m in infos[0].mean)


PEAK_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.slow
def test_evaluate_streams_a_split_ten_times_larger_in_the_same_memory(tiny_config, tmp_path):
    # At 128 px the larger split (1,200 images) is 59 MB as uint8, more than 10% of the
    # evaluating process: holding it, as a whole-split loader does (host and device),
    # would show.
    small = _folder(tmp_path / "small", per_class=(4, 40), size=(128, 128))
    large = _folder(tmp_path / "large", per_class=(4, 400), size=(128, 128), seed=1)
    config = _config(tiny_config, small, "crop_flip", "device")
    config.image_size, config.max_steps_per_epoch = 128, 1
    train.train_and_evaluate(config, str(tmp_path / "run"))
    peaks = {}
    # The first run compiles (and fills the compilation cache): measured apart.
    for name, root in (("warm-up", small), ("small", small), ("large", large)):
        result = run_cli(
            "-c",
            PEAK_RSS,
            sys.executable,
            "-m",
            "vgg_jax.evaluate",
            f"--workdir={tmp_path / 'run'}",
            f"--data_dir={root}",
            "--batch_size=40",
        )
        assert result.returncode == 0, result.stderr
        peaks[name] = int(result.stdout.split()[-1])  # KiB
    assert peaks["large"] <= 1.10 * peaks["small"], peaks
