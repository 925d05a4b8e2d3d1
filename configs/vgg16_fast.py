"""VGG16-BN, fast recipe: the same convolutions as the reference recipe, trained 30 epochs.

What changes against the reference recipe (configs/vgg16.py): random crop (2-pixel pad)
+ flip, with flips only in the last epoch (training ends on the test images' framing), no
per-conv dropout, the classifier straight on the 512 pooled features (`head='linear'`,
no dropout) instead of fc512-BN-fc512, label smoothing 0.1, Nesterov momentum, batch 128
with lr 0.1, coupled L2 5e-4, a one-cycle schedule (1 warm-up epoch, linear decay to 0),
no EMA of the weights, bfloat16 compute. Flip test-time augmentation is reported as
`test_accuracy_flip_tta`, separately from `test_accuracy`.

Run (one GPU):
  python -m vgg_jax.main --config=configs/vgg16_fast.py --workdir=/tmp/vgg16_fast
Target: >= 93% final test accuracy (no TTA) on CIFAR-10 in 30 epochs, under a minute
from launch on one H100/H200. Other stacks: --config.model=vgg11 / vgg13 / vgg19.
CPU regression guard (2 cores), not a tuning target:
  python -m vgg_jax.main --config=configs/vgg16_fast.py --workdir=/tmp/fast_w025 \
      --config.width=0.25 --config.num_epochs=10 --config.dtype=float32
Measured results, ablations included: experiments/RESULTS.md.
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "vgg16"
    config.conv_dropout = "none"
    config.head = "linear"
    config.head_dropout = 0.0
    config.augment = "crop_flip"
    config.crop_padding = 2
    config.flip_only_last_epochs = 1
    config.label_smoothing = 0.1
    config.nesterov = True
    config.batch_size = 128
    config.learning_rate = 0.1
    config.l2 = 5e-4
    config.schedule = "onecycle"
    config.warmup_epochs = 1.0
    config.num_epochs = 30
    config.ema_decay = 0.0
    config.eval_flip_tta = True
    config.dtype = "bfloat16"
    return config
