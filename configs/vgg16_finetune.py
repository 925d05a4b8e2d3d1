"""Fine-tune torchvision's ImageNet VGG16-BN on your own photos: "train on my own images".

Run:  python -m vgg_jax.main --config=configs/vgg16_finetune.py --workdir=/tmp/finetune \
          --config.data_dir=~/photos
      DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg, any sizes (resized to 224).
      The weights (528 MB) download once into ~/.cache/vgg_jax; offline, put
      vgg16_bn-6c64b313.pth there, or pass --config.init_from=/path/to/it. The
      classifier is re-initialised for your class count (logged); the convolutions learn
      at a tenth of the head's rate (backbone_lr_factor); --config.freeze=features trains
      the head only, --config.freeze=block3 keeps blocks 1-3 fixed.
Target: with ImageNet weights, far above training from scratch within a few epochs on a
few hundred photos per class (the usual transfer-learning result). Measured results:
experiments/RESULTS.md.
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "vgg16"
    config.batch_norm = True
    config.conv_dropout = "none"
    config.head = "torchvision"  # torchvision's head, so fc1 and fc2 start trained too
    config.init_from = "torchvision:vgg16_bn"
    config.freeze = "none"
    config.backbone_lr_factor = 0.1
    config.dataset = "image_folder"
    config.data_dir = "~/photos"  # your image folder: override with --config.data_dir
    config.image_size = 224
    config.augment = "crop_flip"
    config.batch_size = 32
    config.num_epochs = 10
    config.learning_rate = 0.01
    config.schedule = "cosine"
    config.warmup_epochs = 1.0
    config.l2 = 1e-4
    config.log_every_steps = 10
    return config
