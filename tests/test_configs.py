"""Every config file loads, names fields that exist, builds its model, and documents
its command."""

import pathlib

import jax
import jax.numpy as jnp
import pytest
from conftest import CONFIGS

from vgg_jax import models, train
from vgg_jax.config_files import load_config_file

CONFIG_FILES = sorted(p for p in CONFIGS.glob("*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_builds_its_model_and_documents_its_command(path: pathlib.Path):
    config = load_config_file(path)
    default = load_config_file(CONFIGS / "default.py")
    assert set(config) == set(default)  # presets override; they never invent fields
    classes = config.synthetic_classes if config.dataset == "synthetic" else 10
    info = train.DatasetInfo(
        tuple(map(str, range(classes))), (0.0,) * 3, (1.0,) * 3, config.image_size, 1, 1
    )
    model = train.build_model(config, info)
    assert isinstance(model, models.VGG)
    images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, 3), jnp.uint8)
    logits = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], images)
    assert logits.shape == (2, classes)
    doc = path.read_text().split('"""')[1]
    assert "python -m vgg_jax" in doc or path.stem == "default"


def test_seed_recipe_matches_the_paddle_numbers():
    config = load_config_file(CONFIGS / "vgg16.py")
    assert (config.batch_size, config.num_epochs, config.augment) == (128, 200, "none")
    assert (config.learning_rate, config.momentum, config.l2) == (0.1, 0.9, 2e-4)
    assert (config.schedule, config.lr_decay_rate, config.lr_decay_samples) == (
        "discexp",
        0.1,
        50000 * 100,
    )
    assert config.conv_dropout == "seed" and config.head == "cifar"
