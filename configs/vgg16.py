"""The PaddlePaddle reference recipe: VGG16-BN with per-conv dropout on CIFAR-10.

Momentum 0.9, lr 0.1 on a mean loss with coupled L2 2e-4 (Paddle: 0.1/128 and
0.0002*128 on a summed cost), lr x0.1 every 100 epochs, batch 128, 200 passes,
no augmentation.

Run:  python -m vgg_jax.main --config=configs/vgg16.py --workdir=/tmp/vgg16
Target: the reference's 89.11% final test accuracy (it took 16h21m on 8 K80s).
Quick CPU try: --config.width=0.25 --config.num_epochs=3 (well above chance by epoch 3).
Measured results: experiments/RESULTS.md.
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "vgg16"
    return config
