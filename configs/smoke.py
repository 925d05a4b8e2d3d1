"""A tiny VGG on a small synthetic dataset made offline: tries the package in seconds.

Run:  python -m vgg_jax.main --config=configs/smoke.py --workdir=/tmp/smoke
Should reach: test accuracy well above chance (10%), typically > 90%, in 4 epochs,
in well under a minute on 2 CPU cores, with no download.
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "vgg_tiny"
    config.conv_dropout = "none"
    config.head_dropout = 0.2
    config.dataset = "synthetic"
    config.image_size = 16
    config.batch_size = 64
    config.num_epochs = 4
    config.learning_rate = 0.05
    config.schedule = "onecycle"
    config.warmup_epochs = 0.5
    config.l2 = 5e-4
    config.log_every_steps = 8
    return config
