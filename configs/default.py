"""Every configuration field, with its default. Presets import this and override.

Run:  python -m vgg_jax.main --config=configs/default.py --workdir=/tmp/vgg
(the defaults are the seed's VGG16 recipe on CIFAR-10; configs/vgg16.py names it).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model.
    config.model = "vgg16"  # vgg11 | vgg13 | vgg16 | vgg19 | vgg_tiny
    config.stages = config_dict.placeholder(tuple)  # explicit channels per block; overrides model
    config.width = 1.0  # channel multiplier applied to every convolution
    config.batch_norm = True  # BN after every convolution (and in the cifar head)
    config.conv_dropout = "seed"  # 'seed' (0.3/0.4 pattern), 'none', or a rate such as '0.2'
    config.head = "cifar"  # cifar (fc512-BN-fc512) | imagenet (4096x2) | tf_seed (2048x2)
    config.head_dropout = 0.5  # dropout rate in the classifier head
    config.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    config.conv_impl = "auto"  # auto (matmul on CPU, XLA conv elsewhere) | xla | matmul

    # Data.
    config.dataset = "cifar10"  # a TFDS name, 'image_folder' or 'synthetic'
    config.data_dir = config_dict.placeholder(str)  # TFDS data dir / image folder root
    config.train_split = "train"  # split to train on
    config.eval_split = "test"  # split to evaluate on after every epoch (all of it)
    config.image_size = 32  # images are resized to image_size x image_size if needed
    config.augment = "none"  # none (the seed) | crop_flip (4-pixel pad + crop, h-flip)
    config.synthetic_train_size = 2048  # examples in the synthetic train split
    config.synthetic_eval_size = 512  # examples in the synthetic eval split
    config.synthetic_classes = 10  # classes in the synthetic dataset

    # Optimisation.
    config.batch_size = 128  # global batch, split over all devices
    config.eval_batch_size = config_dict.placeholder(int)  # None: same as batch_size
    config.num_epochs = 200  # passes over the training split
    config.max_steps_per_epoch = config_dict.placeholder(int)  # cap steps (quick trials)
    config.optimizer = "sgd"  # momentum SGD
    config.learning_rate = 0.1  # peak / base learning rate (for a mean loss)
    config.momentum = 0.9  # momentum coefficient
    config.nesterov = False  # Nesterov momentum
    config.l2 = 2e-4  # coupled L2: l2 * params added to the gradient before momentum
    config.weight_decay = 0.0  # decoupled weight decay, applied after momentum
    config.grad_clip_norm = 0.0  # clip the global gradient norm (0: off)
    config.schedule = "discexp"  # discexp | multistep | cosine | onecycle | constant
    config.lr_decay_rate = 0.1  # discexp / multistep factor
    config.lr_decay_samples = 50000 * 100  # discexp: decay every this many samples seen
    config.lr_boundaries_epochs = (100, 150)  # multistep: epochs where lr is multiplied
    config.warmup_epochs = 0.0  # cosine / onecycle: linear warm-up length
    config.label_smoothing = 0.0  # label smoothing of the training loss
    config.ema_decay = 0.0  # >0: evaluate and predict with an EMA of the weights
    config.eval_flip_tta = False  # also report accuracy with horizontal-flip TTA

    # Run.
    config.seed = 0  # parameter init, dropout and data order all derive from it
    config.log_every_steps = 50  # progress-bar loss refresh interval
    config.progress_bar = True  # show a per-epoch progress bar
    config.distributed = False  # call jax.distributed.initialize() (multi-host)

    # Checkpoints (WORKDIR/checkpoints; rerunning the same command resumes).
    config.checkpoint_every_epochs = 1  # save after every this many epochs (and the last)
    config.keep_checkpoints = 3  # keep this many latest checkpoints, plus the best one
    config.async_checkpointing = True  # write checkpoints in the background
    return config
