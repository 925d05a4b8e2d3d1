"""Every config file loads, names fields that exist, builds its model, and documents
its command."""

import pathlib
import re
import time

import jax
import jax.numpy as jnp
import pytest
from conftest import CONFIGS, run_cli

from vgg_jax import config_checks, configuration, models
from vgg_jax.configuration import load_config_file
from vgg_jax.data import DatasetInfo

CONFIG_FILES = sorted(p for p in CONFIGS.glob("*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_builds_its_model_and_documents_its_command(path: pathlib.Path):
    config = load_config_file(path)
    default = load_config_file(CONFIGS / "default.py")
    assert set(config) == set(default)  # presets override; they never invent fields
    classes = config.synthetic_classes if config.dataset == "synthetic" else 10
    info = DatasetInfo(
        tuple(map(str, range(classes))), (0.0,) * 3, (1.0,) * 3, config.image_size, 1, 1
    )
    model = models.build_model(config, info)
    assert isinstance(model, models.VGG)
    images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, 3), jnp.uint8)
    logits = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    assert logits.shape == (2, classes)
    doc = path.read_text().split('"""')[1]
    assert "python -m vgg_jax" in doc or path.stem == "default"


def test_reference_recipe_matches_the_paddle_numbers():
    config = load_config_file(CONFIGS / "vgg16.py")
    assert (config.batch_size, config.num_epochs, config.augment) == (128, 200, "none")
    assert (config.learning_rate, config.momentum, config.l2) == (0.1, 0.9, 2e-4)
    assert (config.schedule, config.lr_decay_rate, config.lr_decay_samples) == (
        "discexp",
        0.1,
        50000 * 100,
    )
    assert config.conv_dropout == "paddle" and config.head == "cifar"


def _smoke():
    return load_config_file(CONFIGS / "smoke.py")


def test_every_preset_passes_the_check():
    for path in CONFIG_FILES:
        config_checks.validate(load_config_file(path))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model", "vgg17", "is not one of vgg11"),
        ("head", "tf_seed", "'tf_seed' is now called 'tf_benchmark'"),
        ("conv_dropout", "seed", "'seed' is now called 'paddle'"),
        ("conv_dropout", "1.5", "not 'paddle', 'none' or a rate"),
        ("dtype", "float16", "is not one of float32, bfloat16"),
        ("schedule", "cosin", "is not one of"),
        ("augment", "flip", "is not one of"),
        ("crop_padding", -1, "outside [0, inf)"),
        ("flip_only_last_epochs", -1, "outside [0, inf)"),
        ("flip_only_last_epochs", 1, "applies to augment='crop_flip', not 'none'"),
        ("conv_impl", "fast", "is not one of"),
        ("image_size", 0, "outside [1, 1024]"),
        ("image_size", 100000, "outside [1, 1024]"),
        ("image_size", 4, "below 8"),
        ("width", 0.0, "outside (0, inf)"),
        ("width", -1.0, "outside (0, inf)"),
        ("learning_rate", -0.1, "outside (0, inf)"),
        ("label_smoothing", 2.0, "outside [0, 1)"),
        ("ema_decay", 1.5, "outside [0, 1)"),
        ("ema_decay", -0.5, "outside [0, 1)"),
        ("num_epochs", -3, "outside [1, inf)"),
        ("checkpoint_every_epochs", 0, "outside [1, inf)"),
        ("log_every_steps", 0, "outside [1, inf)"),
        ("max_steps_per_epoch", -1, "outside [1, inf)"),
        ("stages", (8, 16), "is not channels per block"),
        ("seed", -1, "outside [0, inf)"),
        ("synthetic_train_size", 0, "outside [1, inf)"),
        ("synthetic_classes", 0, "outside [2, inf)"),
        ("lr_decay_samples", 0, "outside [1, inf)"),
        ("train_split", "trian", "the synthetic dataset has only"),
        ("warmup_epochs", 4.0, "leaves nothing of 4 epochs"),
    ],
)
def test_each_bad_value_is_named(field, value, message):
    config = _smoke()
    config[field] = value
    with pytest.raises(configuration.ConfigError) as error:
        config_checks.validate(config)
    assert f"{field}: " in str(error.value) and message in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"coordinator_address": "notahost"}, "coordinator_address: 'notahost' is not HOST:PORT"),
        ({"coordinator_address": "10.0.0.1:99999"}, "is not HOST:PORT (a port 1-65535)"),
        ({"coordinator_address": ":1234"}, "':1234' is not HOST:PORT"),
        ({"distributed_init_timeout_seconds": 0}, "distributed_init_timeout_seconds: 0 is below 1"),
        ({"distributed_heartbeat_timeout_seconds": -5}, "-5 is below 1"),
    ],
)
def test_bad_distributed_settings_are_named(overrides, message):
    config = _smoke()
    config.distributed = True
    config.update(overrides)
    with pytest.raises(configuration.ConfigError, match=re.escape(message)):
        config_checks.validate(config)


@pytest.mark.parametrize(
    ("field", "value"), [("process_id", 1), ("num_processes", 2), ("coordinator_address", "h:1")]
)
def test_distributed_fields_without_distributed_are_refused(field, value):
    config = _smoke()
    config[field] = value
    with pytest.raises(configuration.ConfigError, match=f"{field}: is set, but distributed=False"):
        config_checks.validate(config)
    config.distributed = True
    config_checks.validate(config)  # with it, they are fine


def test_every_problem_is_reported_at_once_and_fast():
    config = _smoke()
    config.model, config.dtype, config.schedule = "vgg61", "bfloat61", "cosin"
    start = time.perf_counter()
    found = config_checks.problems(config)
    assert time.perf_counter() - start < 0.1
    assert [line.split(":")[0] for line in found] == ["model", "dtype", "schedule"]
    config.batch_size = 12
    assert any(
        "batch_size: 12 does not divide over 8 devices" in p
        for p in config_checks.problems(config, 8)
    )


def test_three_typos_on_the_command_line_give_one_line_before_any_data(tmp_path):
    start = time.perf_counter()
    result = run_cli(
        "vgg_jax.main",
        f"--config={CONFIGS / 'smoke.py'}",
        f"--workdir={tmp_path}",
        "--config.model=vgg61",
        "--config.dtype=bfloat61",
        "--config.schedule=cosin",
    )
    seconds = time.perf_counter() - start
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 3 problems in the config")
    for field in ("model: 'vgg61'", "dtype: 'bfloat61'", "schedule: 'cosin'"):
        assert field in lines[0]
    assert seconds < 2.0, seconds  # JAX is not even imported before the check
    assert not any(tmp_path.iterdir())  # no data read, no checkpoint folder made


def test_stored_configs_of_earlier_versions_are_completed_and_renamed():
    stored = {"model": "vgg16", "conv_dropout": "seed", "head": "tf_seed", "retired_field": 1}
    config = configuration.from_stored(stored)
    assert (config.conv_dropout, config.head) == ("paddle", "tf_benchmark")
    assert config.batch_size == configuration.default_config().batch_size  # filled in
    assert "retired_field" not in config
    with pytest.raises(AttributeError):
        config.new_field = 1  # locked, like the CLI's
