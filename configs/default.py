"""Every configuration field with its default: `vgg_jax.configuration.default_config`
(src/vgg_jax/configuration.py lists each field with a one-line comment). Presets start
from it and override.

Run:  python -m vgg_jax.main --config=configs/default.py --workdir=/tmp/vgg
(the defaults are the PaddlePaddle reference's VGG16 recipe on CIFAR-10, which
configs/vgg16.py names).
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    return default_config()
