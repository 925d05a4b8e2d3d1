"""VGG19-BN trained with the seed's recipe (see configs/vgg16.py) on CIFAR-10.

Run:  python -m vgg_jax.main --config=configs/vgg19.py --workdir=/tmp/vgg19
Should reach: roughly the seed's VGG16 figure (about 88-90%) after 200 epochs;
not yet measured here, see experiments/RESULTS.md.
"""

import ml_collections

from vgg_jax.config_files import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__)
    config.model = "vgg19"
    return config
