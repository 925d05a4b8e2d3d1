"""Every configuration field with its default, what may change when a run resumes, and
configs read from files and checkpoints. Like `config_checks` (which values the fields
accept), it imports no JAX: a config is checked before any data or device is touched."""

from __future__ import annotations

import json
import os
import runpy
from typing import Any

import ml_collections
from ml_collections import config_dict

from vgg_jax import spec

DTYPES = ("float32", "bfloat16")
SCHEDULES = ("discexp", "multistep", "cosine", "onecycle", "constant")
AUGMENTATIONS = ("none", "crop_flip", "random_resized_crop", "scale_jitter")
# What the device-resident input can do; the others run on the host (streaming).
DEVICE_AUGMENTATIONS = ("none", "crop_flip")
INPUTS = ("auto", "device", "stream")
# auto: the CPU kernels of vgg_jax.cpu on a CPU backend, stock Flax layers elsewhere;
# xla: stock Flax layers everywhere; matmul: the CPU kernels on any backend.
CONV_IMPLS = ("auto", "xla", "matmul")
SYNTHETIC_SPLITS = ("train", "test")
MAX_IMAGE_SIZE = 1024
# Schedules shaped by the run's length: a warm-up, then a decay to 0 at the last step. A
# run with one may not be resumed with another num_epochs (the rate would jump).
LENGTH_DEPENDENT_SCHEDULES = ("cosine", "onecycle")
# Fields that may change between a run and its resumption: they do not alter the
# parameters' shapes, the data order or the optimisation path already taken.
RESUMABLE_CHANGES = frozenset(
    # the run's length, where its data is, what it reports and how it checkpoints
    ("num_epochs", "data_dir", "progress_bar", "log_every_steps", "eval_batch_size")
    + ("checkpoint_every_epochs", "keep_checkpoints", "async_checkpointing")
    # how its processes meet
    + ("distributed", "coordinator_address", "num_processes", "process_id")
    + ("distributed_init_timeout_seconds", "distributed_heartbeat_timeout_seconds")
    # how the same numbers are computed
    + ("input_workers", "input_threads", "conv_impl")
)


def default_config() -> ml_collections.ConfigDict:
    """The defaults: the PaddlePaddle reference recipe (VGG16-BN) on CIFAR-10."""
    config = ml_collections.ConfigDict()

    # Model.
    config.model = "vgg16"  # a key of spec.STAGES
    config.stages = config_dict.placeholder(tuple)  # explicit channels per block; overrides model
    config.width = 1.0  # channel multiplier applied to every convolution
    config.batch_norm = True  # BN after every convolution (and in the cifar head)
    config.conv_dropout = "paddle"  # 'paddle' (0.3/0.4 pattern), 'none', or a rate like '0.2'
    config.head = "cifar"  # a key of spec.HEADS
    config.head_dropout = 0.5  # dropout rate in the classifier head
    config.dtype = "float32"  # compute dtype, one of DTYPES (params stay float32)
    config.conv_impl = "auto"  # one of CONV_IMPLS

    # Data.
    config.dataset = "cifar10"  # a TFDS name, 'image_folder' or 'synthetic'
    config.data_dir = config_dict.placeholder(str)  # TFDS data dir / image folder root
    config.train_split = "train"  # split to train on
    config.eval_split = "test"  # split to evaluate on after every epoch (all of it)
    config.image_size = 32  # images are resized to image_size x image_size if needed
    config.augment = "none"  # one of AUGMENTATIONS (docs/data.md)
    config.crop_padding = 4  # crop_flip: zero pixels added on each side before the random crop
    config.flip_only_last_epochs = 0  # crop_flip: the last this many epochs flip, never crop
    config.input = "auto"  # auto | device (splits on the devices) | stream (grain, host)
    config.device_input_budget_gb = 4.0  # auto: device-resident up to this many GiB of uint8
    config.input_workers = 2  # stream: decoding processes per host (0: none, -1: CPUs - 1)
    config.input_threads = 1  # stream: decoding threads per worker (or in this process if 0)
    config.synthetic_train_size = 2048  # examples in the synthetic train split
    config.synthetic_eval_size = 512  # examples in the synthetic eval split
    config.synthetic_classes = 10  # classes in the synthetic dataset

    # Starting point: fine-tuning.
    config.init_from = config_dict.placeholder(str)  # weights to start from (docs/pretrained.md)
    config.freeze = "none"  # none | features | blockN: these conv blocks are not trained
    config.backbone_lr_factor = 1.0  # conv layers' learning rate as a fraction of the head's

    _add_training_fields(config)
    return config


def _add_training_fields(config: ml_collections.ConfigDict) -> None:
    """The optimisation, run and checkpoint fields of `default_config`."""
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
    config.schedule = "discexp"  # one of SCHEDULES
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
    config.coordinator_address = config_dict.placeholder(str)  # HOST:PORT (None: auto-detect)
    config.num_processes = config_dict.placeholder(int)  # processes in all (None: auto-detect)
    config.process_id = config_dict.placeholder(int)  # this process, 0.. (None: auto-detect)
    # distributed: how long every process waits for all to connect (schedulers may start
    # them minutes apart), and how long a silent peer (dead, or its host unreachable) may
    # go unnoticed before every process stops with one line.
    config.distributed_init_timeout_seconds = 300
    config.distributed_heartbeat_timeout_seconds = 60

    # Checkpoints (WORKDIR/checkpoints; rerunning the same command resumes).
    config.checkpoint_every_epochs = 1  # save after every this many epochs (and the last)
    config.keep_checkpoints = 3  # keep this many latest checkpoints, plus the best one
    config.async_checkpointing = True  # write checkpoints in the background


class ConfigError(ValueError):
    """The config has values that cannot work; the message lists every one of them."""


def from_stored(values: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config stored with a checkpoint (JSON values) as a full, locked config: fields
    added since it was written get their defaults, renamed values their new names, lists
    become tuples, fields this version no longer has are dropped."""
    config = default_config()
    for name, value in values.items():
        if name in config:
            if isinstance(value, str):
                value = spec.RENAMED.get(name, {}).get(value, value)
            config[name] = _to_tuple(value)
    config.lock()
    return config


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the Python file at `path`."""
    return runpy.run_path(os.fspath(path))["get_config"]()


def resume_differences(saved: dict[str, Any], current: ml_collections.ConfigDict) -> list[str]:
    """'field: saved -> current' for every field outside RESUMABLE_CHANGES that differs
    between `current` and the run stored with config `saved` (JSON values); fields only
    one side has are not compared. (num_epochs with a LENGTH_DEPENDENT_SCHEDULES
    schedule: `resume` says so in its own words.)"""
    saved_values = json.loads(from_stored(saved).to_json())
    current_values = json.loads(current.to_json())
    names = sorted((set(saved) & set(current_values)) - RESUMABLE_CHANGES)
    return [
        f"{name}: {saved_values.get(name)!r} -> {current_values.get(name)!r}"
        for name in names
        if saved_values.get(name) != current_values.get(name)
    ]
