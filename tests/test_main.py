"""End to end: the command line on the synthetic smoke config, an image folder, and TFDS
mock data; and the one-line errors."""

import json

import pytest
from conftest import CLI_DEVICES, CONFIGS, REPO, run_cli

import vgg_jax
from vgg_jax.metrics_log import read_metrics

REQUIRED_KEYS = {
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "learning_rate",
    "epoch_seconds",
    "wall_time",
}


MOCKED_MAIN = """
import sys
import tensorflow_datasets as tfds
from vgg_jax import main
from vgg_jax.data import sources
sources.network_available = lambda *a, **k: True  # mock_data fakes the download
sys.argv = ["vgg_jax.main", *sys.argv[1:]]
with tfds.testing.mock_data(num_examples=64):
    main.run()
"""


@pytest.mark.slow
def test_smoke_config_learns_from_the_command_line(smoke_run):
    # The README's command, with `~` in the workdir (expanded, no folder named "~").
    workdir, stderr = smoke_run["workdir"], smoke_run["stderr"]
    assert workdir == smoke_run["home"] / "smoke" and not (REPO / "~").exists()
    records = read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) >= REQUIRED_KEYS
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_accuracy"] > records[0]["test_accuracy"]
    assert records[-1]["test_accuracy"] > 0.5  # chance is 0.1
    assert "epoch 4/4" in stderr
    assert list(workdir.glob("events.out.tfevents*"))
    assert vgg_jax.load(workdir).step == 4 * 32


@pytest.mark.slow
def test_image_folder_end_to_end(tmp_path, image_folder):
    workdir = tmp_path / "work"
    result = run_cli(
        "vgg_jax.main",
        f"--config={CONFIGS / 'smoke.py'}",
        f"--workdir={workdir}",
        "--config.dataset=image_folder",
        f"--config.data_dir={image_folder}",
        "--config.batch_size=8",
        "--config.num_epochs=2",
        "--config.progress_bar=False",
    )
    assert result.returncode == 0, result.stderr
    records = read_metrics(workdir)
    assert len(records) == 2
    assert 0.0 <= records[-1]["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_tfds_mock_data_end_to_end(tmp_path):
    result = run_cli(
        "-c",
        MOCKED_MAIN,
        f"--config={CONFIGS / 'vgg16.py'}",
        f"--workdir={tmp_path}",
        "--config.model=vgg_tiny",
        "--config.batch_size=32",
        "--config.num_epochs=1",
        "--config.augment=crop_flip",
        "--config.progress_bar=False",
    )
    assert result.returncode == 0, result.stderr
    (record,) = read_metrics(tmp_path)
    assert record["step"] == 2
    assert json.loads(json.dumps(record)) == record


def test_unknown_override_is_one_line_naming_the_field(tmp_path):
    result = run_cli(
        "vgg_jax.main",
        f"--config={CONFIGS / 'smoke.py'}",
        f"--workdir={tmp_path}",
        "--config.batch_sizee=3",
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "batch_sizee" in lines[0], result.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--config.batch_size=many", "batch_size"),
        (f"--config.batch_size={CLI_DEVICES + 1}", f"over {CLI_DEVICES} devices"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, override, expected):
    result = run_cli(
        "vgg_jax.main", f"--config={CONFIGS / 'smoke.py'}", f"--workdir={tmp_path}", override
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
