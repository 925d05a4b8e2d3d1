"""VGG11-BN trained with the PaddlePaddle reference recipe (see configs/vgg16.py) on CIFAR-10.

Run:  python -m vgg_jax.main --config=configs/vgg11.py --workdir=/tmp/vgg11
Target: about the reference's VGG16 figure (89%) after 200 epochs.
The fast recipe on this stack:
  python -m vgg_jax.main --config=configs/vgg16_fast.py --config.model=vgg11 --workdir=/tmp/f
Measured results: experiments/RESULTS.md.
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "vgg11"
    return config
