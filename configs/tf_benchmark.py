"""The TensorFlow reference's benchmark network: plain VGG16 on 224x224x3 input.

No batch norm, no convolutional dropout, the reference's fc2048-2048 head, 1000 classes,
batch 128. The dataset is synthetic so that nothing is ever downloaded; this config is
meant for timing, not for accuracy.

Run:  python -m vgg_jax.benchmark --config=configs/tf_benchmark.py [--compare=torch]
Measures: seconds per batch (mean +- std after 10 burn-in steps), images/s, TFLOP/s and
fraction of peak of the eval forward pass and of the full train step (forward, backward,
momentum SGD), the TF reference's two figures. Target: at least PyTorch's speed on the
same GPU. Measured results: experiments/RESULTS.md.
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "vgg16"
    config.batch_norm = False
    config.conv_dropout = "none"
    config.head = "tf_benchmark"
    config.dataset = "synthetic"
    config.synthetic_classes = 1000
    config.image_size = 224
    config.batch_size = 128
    return config
