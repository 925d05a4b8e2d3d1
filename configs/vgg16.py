"""The seed's PaddlePaddle recipe: VGG16-BN with per-conv dropout on CIFAR-10.

Momentum 0.9, lr 0.1 on a mean loss with coupled L2 2e-4 (Paddle: 0.1/128 and
0.0002*128 on a summed cost), lr x0.1 every 100 epochs, batch 128, 200 passes,
no augmentation. The seed reached 89.11% in 16h21m on 8 K80s.

Run:  python -m vgg_jax.main --config=configs/vgg16.py --workdir=/tmp/vgg16
Should reach: about 89% test accuracy after 200 epochs (CIFAR-10).
Quick CPU try: --config.width=0.25 --config.num_epochs=3 gives >= 25% after epoch 3.
"""

import ml_collections

from vgg_jax.config_files import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__)
    config.model = "vgg16"
    return config
