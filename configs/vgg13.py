"""VGG13-BN trained with the PaddlePaddle reference recipe (see configs/vgg16.py) on CIFAR-10.

Run:  python -m vgg_jax.main --config=configs/vgg13.py --workdir=/tmp/vgg13
Target: about the reference's VGG16 figure (89%) after 200 epochs.
The fast recipe on this stack:
  python -m vgg_jax.main --config=configs/vgg16_fast.py --config.model=vgg13 --workdir=/tmp/f
Measured results: experiments/RESULTS.md.
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "vgg13"
    return config
