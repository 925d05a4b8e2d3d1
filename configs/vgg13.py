"""VGG13-BN trained with the PaddlePaddle reference recipe (see configs/vgg16.py) on CIFAR-10.

Run:  python -m vgg_jax.main --config=configs/vgg13.py --workdir=/tmp/vgg13
Should reach: roughly the reference's VGG16 figure (about 88-90%) after 200 epochs;
not yet measured at full width, see experiments/RESULTS.md.

The fast recipe on this stack:
  python -m vgg_jax.main --config=configs/vgg16_fast.py --config.model=vgg13 --workdir=/tmp/f
Measured so far only on CPU at width 0.25, float32, 6 epochs (batch 256, lr 0.2, 1 warm-up
epoch): 79.5% final test accuracy on CIFAR-10 (JPEG q75), see experiments/RESULTS.md.
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "vgg13"
    return config
