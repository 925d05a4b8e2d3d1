"""VGG16-BN on ImageNet (ILSVRC-2012) at 224x224: torchvision's recipe, streamed.

SGD with momentum 0.9, lr 0.01 for a batch of 256 (scale it with the batch: 0.01 x
batch/256), coupled L2 (PyTorch's weight_decay) 5e-4, lr x0.1 every 30 epochs, 90 epochs;
random-resized-crop (8-100% of the area, aspect 3/4-4/3) and flips on the host workers,
evaluation on the centre 224 crop of the image resized to 256 on its shorter side;
top-1 (`test_accuracy`) and top-5 (`test_top5_accuracy`) in the log and metrics.jsonl.

Prepare ImageNet once (docs/data.md, "ImageNet"), then:
  python -m vgg_jax.main --config=configs/vgg16_imagenet.py --workdir=/tmp/vgg16_imagenet
Several hosts: add --config.distributed=True (docs/multihost.md).
Target: about 73.4% top-1 / 91.5% top-5 (torchvision's VGG16-BN; plain VGG16,
--config.batch_norm=False: 71.6% / 90.4%). Measured results: experiments/RESULTS.md.
Quick try on a small JPEG folder (DIR/train/<class>/*, DIR/test or DIR/val/<class>/*):
  --config.dataset=image_folder --config.data_dir=DIR --config.width=0.125
  --config.image_size=64 --config.num_epochs=1
"""

import ml_collections

from vgg_jax.configuration import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "vgg16"
    config.batch_norm = True
    config.conv_dropout = "none"
    config.head = "imagenet"
    config.head_dropout = 0.5
    config.dataset = "imagenet2012"
    config.train_split = "train"
    config.eval_split = "validation"
    config.image_size = 224
    config.augment = "random_resized_crop"
    config.input = "stream"
    config.input_workers = -1  # every CPU but one decodes
    config.batch_size = 256
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.l2 = 5e-4
    config.schedule = "multistep"
    config.lr_boundaries_epochs = (30, 60)
    config.lr_decay_rate = 0.1
    config.num_epochs = 90
    config.dtype = "bfloat16"
    config.log_every_steps = 100
    return config
