"""Every configuration field with its default, the check that a config makes sense, and
the loading of config files and of configs stored with checkpoints.

This module imports no JAX, so a config is checked in a fraction of a second, before
any data is read or any device is touched.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Callable
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
# init_from: None or '' (random init), published weights by name (spec.PRETRAINED, e.g.
# 'torchvision:vgg16_bn', 'keras:vgg16'), a weight file (.pth, .safetensors, .h5) or
# another run's workdir / checkpoint. Layers whose shapes differ in the head (the
# classifier when the class count differs) are re-initialised; the input normalisation
# becomes the source's.
INIT_FROM_PREFIXES = ("torchvision:", "keras:")
MAX_IMAGE_SIZE = 1024
# Schedules shaped by the run's length: a warm-up, then a decay to 0 at the last step. A
# run with one may not be resumed with another num_epochs (the rate would jump).
LENGTH_DEPENDENT_SCHEDULES = ("cosine", "onecycle")
# Fields that may change between a run and its resumption: they do not alter the
# parameters' shapes, the data order or the optimisation path already taken.
RESUMABLE_CHANGES = frozenset(
    {
        "num_epochs",
        "data_dir",
        "progress_bar",
        "log_every_steps",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "eval_batch_size",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
        "distributed_init_timeout_seconds",
        "distributed_heartbeat_timeout_seconds",
        "input_workers",
        "input_threads",
        "conv_impl",
        "async_checkpointing",
    }
)


def default_config() -> ml_collections.ConfigDict:
    """The defaults: the PaddlePaddle reference recipe (VGG16-BN) on CIFAR-10."""
    config = ml_collections.ConfigDict()

    # Model.
    config.model = "vgg16"  # vgg11 | vgg13 | vgg16 | vgg19 | vgg_tiny
    config.stages = config_dict.placeholder(tuple)  # explicit channels per block; overrides model
    config.width = 1.0  # channel multiplier applied to every convolution
    config.batch_norm = True  # BN after every convolution (and in the cifar head)
    config.conv_dropout = "paddle"  # 'paddle' (0.3/0.4 pattern), 'none', or a rate like '0.2'
    config.head = "cifar"  # cifar (fc512-BN-fc512) | linear | imagenet (4096x2) | tf_benchmark
    config.head_dropout = 0.5  # dropout rate in the classifier head
    config.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    config.conv_impl = "auto"  # auto | xla | matmul (see CONV_IMPLS above)

    # Data.
    config.dataset = "cifar10"  # a TFDS name, 'image_folder' or 'synthetic'
    config.data_dir = config_dict.placeholder(str)  # TFDS data dir / image folder root
    config.train_split = "train"  # split to train on
    config.eval_split = "test"  # split to evaluate on after every epoch (all of it)
    config.image_size = 32  # images are resized to image_size x image_size if needed
    config.augment = "none"  # none | crop_flip | random_resized_crop | scale_jitter (docs/data.md)
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
    config.init_from = config_dict.placeholder(str)  # weights to start from (see INIT_FROM)
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


def _one_of(choices: tuple[str, ...], field: str = "") -> Callable[[Any], str | None]:
    def check(value):
        if value in choices:
            return None
        renamed = spec.RENAMED.get(field, {}).get(value)
        if renamed:
            return f"{value!r} is now called {renamed!r}"
        return f"{value!r} is not one of {', '.join(choices)}"

    return check


def _number(low: float, high: float = math.inf, *, low_open=False, high_open=True):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{value!r} is not a number"
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high or math.isnan(value):
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            return f"{value!r} is outside {left}{low:g}, {high:g}{right}"
        return None

    return check


def _optional(check):
    return lambda value: None if value is None else check(value)


def _conv_dropout(value):
    if value in spec.CONV_DROPOUT_PATTERNS or spec.parse_rate(str(value)) is not None:
        return None
    renamed = spec.RENAMED["conv_dropout"].get(value)
    if renamed:
        return f"{value!r} is now called {renamed!r}"
    return f"{value!r} is not 'paddle', 'none' or a rate in [0, 1)"


def _stages(value):
    if value is None:
        return None
    ok = (
        isinstance(value, tuple)
        and len(value) > 0
        and all(
            isinstance(block, tuple)
            and len(block) > 0
            and all(isinstance(c, int) and c > 0 for c in block)
            for block in value
        )
    )
    return None if ok else f"{value!r} is not channels per block, e.g. ((64,), (128, 128))"


def _init_from(value):
    if value is None or value == "":  # '--config.init_from=' (empty): from scratch
        return None
    if not isinstance(value, str):
        return f"{value!r} is not a weights name or a path"
    if value in spec.PRETRAINED:
        return None
    if value.startswith(INIT_FROM_PREFIXES):
        return f"{value!r} is not one of {', '.join(spec.PRETRAINED)}"
    if not os.path.exists(os.path.expanduser(value)):
        return f"{value!r}: no such file or folder"
    return None


def _freeze(value):
    if value in ("none", "features"):
        return None
    if isinstance(value, str) and re.fullmatch(r"block[1-9]\d*", value):
        return None
    return f"{value!r} is not 'none', 'features' or 'blockN' (blocks 1..N frozen)"


def _seed(value):
    if _number(0)(value) is None and (not isinstance(value, int) or value >= 2**32):
        return f"{value!r} is not an integer in [0, 2**32 - 1] (grain takes 32-bit seeds)"
    return _number(0)(value)


def _nonempty(value):
    return None if isinstance(value, str) and value else "must be a non-empty name"


def _host_port(value):
    if not isinstance(value, str):
        return f"{value!r} is not HOST:PORT"
    host, colon, port = value.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{value!r} is not HOST:PORT (a port 1-65535), e.g. 10.0.0.1:1234"
    return None


def _whole(low: int):
    """A whole number from `low` up (JAX takes its timeouts as whole seconds)."""

    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not a whole number"
        return None if value >= low else f"{value!r} is below {low}"

    return check


POSITIVE = _number(1)
FRACTION = _number(0, 1)
NON_NEGATIVE = _number(0)

CHECKS: dict[str, Callable[[Any], str | None]] = {
    "model": _one_of(tuple(spec.STAGES)),
    "stages": _stages,
    "width": _number(0, low_open=True),
    "conv_dropout": _conv_dropout,
    "head": _one_of(tuple(spec.HEADS), "head"),
    "head_dropout": FRACTION,
    "dtype": _one_of(DTYPES),
    "conv_impl": _one_of(CONV_IMPLS),
    "dataset": _nonempty,
    "train_split": _nonempty,
    "eval_split": _nonempty,
    "image_size": _number(1, MAX_IMAGE_SIZE, high_open=False),
    "augment": _one_of(AUGMENTATIONS),
    "crop_padding": NON_NEGATIVE,
    "flip_only_last_epochs": NON_NEGATIVE,
    "input": _one_of(INPUTS),
    "device_input_budget_gb": NON_NEGATIVE,
    "input_workers": _number(-1),
    "input_threads": POSITIVE,
    "seed": _seed,
    "coordinator_address": _optional(_host_port),
    "num_processes": _optional(POSITIVE),
    "process_id": _optional(NON_NEGATIVE),
    "synthetic_train_size": POSITIVE,
    "synthetic_eval_size": POSITIVE,
    "synthetic_classes": _number(2),
    "batch_size": POSITIVE,
    "eval_batch_size": _optional(POSITIVE),
    "num_epochs": POSITIVE,
    "max_steps_per_epoch": _optional(POSITIVE),
    "init_from": _init_from,
    "freeze": _freeze,
    "backbone_lr_factor": _number(0, 1, low_open=True, high_open=False),
    "optimizer": _one_of(("sgd",)),
    "learning_rate": _number(0, low_open=True),
    "momentum": FRACTION,
    "l2": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "grad_clip_norm": NON_NEGATIVE,
    "schedule": _one_of(SCHEDULES),
    "lr_decay_rate": _number(0, low_open=True),
    "lr_decay_samples": POSITIVE,
    "warmup_epochs": NON_NEGATIVE,
    "label_smoothing": FRACTION,
    "ema_decay": FRACTION,
    "distributed_init_timeout_seconds": _whole(1),
    "distributed_heartbeat_timeout_seconds": _whole(1),
    "log_every_steps": POSITIVE,
    "checkpoint_every_epochs": POSITIVE,
    "keep_checkpoints": POSITIVE,
}


def problems(config: ml_collections.ConfigDict, device_count: int | None = None) -> list[str]:
    """Every problem of `config`, one 'field: what is wrong' line each."""
    found = [
        f"{field}: {message}"
        for field, check in CHECKS.items()
        if (message := check(config[field])) is not None
    ]
    found += _cross_field_problems(config, device_count)
    return found


def _cross_field_problems(config: ml_collections.ConfigDict, device_count: int | None):
    found = []
    stages = config.stages or spec.STAGES.get(config.model)
    if stages and isinstance(config.image_size, int):
        smallest = 2 ** len(stages)
        if 1 <= config.image_size < smallest:
            found.append(
                f"image_size: {config.image_size} is below {smallest}, the least that "
                f"{len(stages)} 2x2 max-pools leave a pixel of"
            )
    found += _init_from_problems(config, stages)
    found += _width_problems(config, stages)
    if config.dataset == "image_folder" and not config.data_dir:
        found.append("data_dir: dataset='image_folder' needs --config.data_dir=DIR")
    if config.dataset == "synthetic":
        for field in ("train_split", "eval_split"):
            if config[field] not in SYNTHETIC_SPLITS:
                found.append(f"{field}: the synthetic dataset has only {SYNTHETIC_SPLITS}")
    warmup_schedule = config.schedule in LENGTH_DEPENDENT_SCHEDULES
    if warmup_schedule and config.warmup_epochs >= config.num_epochs > 0:
        found.append(
            f"warmup_epochs: {config.warmup_epochs} leaves nothing of "
            f"{config.num_epochs} epochs to decay over"
        )
    if config.input == "device" and config.augment not in DEVICE_AUGMENTATIONS:
        found.append(
            f"augment: {config.augment!r} runs on the host: use --config.input=stream or auto"
        )
    if config.flip_only_last_epochs and config.augment != "crop_flip":
        found.append(
            f"flip_only_last_epochs: applies to augment='crop_flip', not {config.augment!r}"
        )
    if config.input == "stream" and config.dataset == "synthetic":
        found.append("input: the synthetic dataset is made in memory: use 'device' or 'auto'")
    if not config.distributed:
        for field in ("coordinator_address", "num_processes", "process_id"):
            if config[field] is not None:
                found.append(
                    f"{field}: is set, but distributed=False: add --config.distributed=True"
                )
    ids = (config.process_id, config.num_processes)
    if all(isinstance(v, int) for v in ids) and ids[0] >= ids[1]:
        found.append(f"process_id: {ids[0]} is not below num_processes={ids[1]}")
    boundaries = config.lr_boundaries_epochs
    if not (isinstance(boundaries, tuple) and all(_number(0)(b) is None for b in boundaries)):
        found.append(f"lr_boundaries_epochs: {boundaries!r} is not a tuple of epochs >= 0")
    if device_count:
        for field in ("batch_size", "eval_batch_size"):
            value = config[field]
            if isinstance(value, int) and value > 0 and value % device_count:
                found.append(
                    f"{field}: {value} does not divide over {device_count} devices; try "
                    f"{max(1, value // device_count) * device_count}"
                )
    return found


def _width_problems(config: ml_collections.ConfigDict, stages) -> list[str]:
    """A width whose convolution kernels alone (float32) outgrow this machine's memory:
    refused before any data is read, rather than failing in the first allocation."""
    if not stages or _stages(config.stages) or CHECKS["width"](config.width):
        return []  # those are reported as they are
    scaled = spec.scaled_stages(stages, config.width)
    channels = [3, *(c for block in scaled for c in block)]
    kernel_bytes = 4 * 9 * sum(a * b for a, b in zip(channels, channels[1:], strict=False))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not reported on this platform
        return []
    if kernel_bytes <= memory:
        return []
    return [
        f"width: {config.width:g} gives convolutions of up to {max(channels)} channels whose "
        f"kernels alone take {kernel_bytes / 2**30:.3g} GiB, more than this machine's "
        f"{memory / 2**30:.3g} GiB of memory"
    ]


def _init_from_problems(config: ml_collections.ConfigDict, stages) -> list[str]:
    found = []
    freeze = config.freeze
    if not config.init_from:  # nothing pretrained: nothing to freeze or to train slower
        if freeze != "none" and _freeze(freeze) is None:
            found.append(f"freeze: {freeze!r} keeps pretrained layers: it needs init_from")
        if (
            config.backbone_lr_factor != 1
            and CHECKS["backbone_lr_factor"](config.backbone_lr_factor) is None
        ):
            found.append(
                f"backbone_lr_factor: {config.backbone_lr_factor} slows pretrained layers: "
                "it needs init_from"
            )
    blocks = isinstance(freeze, str) and freeze.startswith("block") and _freeze(freeze) is None
    if stages and blocks and int(freeze[5:]) > len(stages):
        found.append(f"freeze: {freeze!r} but the model has {len(stages)} blocks")
    if config.init_from in spec.PRETRAINED:
        model, batch_norm = spec.PRETRAINED[config.init_from]
        wanted = {"model": model, "batch_norm": batch_norm, "width": 1.0, "stages": None}
        wrong = [f"{k}={v!r}" for k, v in wanted.items() if config[k] != v]
        if wrong:
            found.append(
                f"init_from: {config.init_from} needs {', '.join(wrong)} "
                f"(this config: {', '.join(f'{k}={config[k]!r}' for k in wanted)})"
            )
    return found


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises ConfigError naming every problem of `config` at once."""
    found = problems(config, device_count)
    if found:
        raise ConfigError(
            f"{len(found)} problem{'s' if len(found) > 1 else ''} in the config: "
            + "; ".join(found)
        )


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
    path = os.fspath(path)
    name = "vgg_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config()


def resume_differences(saved: dict[str, Any], current: ml_collections.ConfigDict) -> list[str]:
    """What stops `current` from resuming a run stored with config `saved` (JSON values):
    'field: saved -> current' for every changed field outside RESUMABLE_CHANGES (fields
    only one side has, added or removed in a later version, are not compared; values
    renamed since, under their new names). num_epochs, resumable in general, is not with
    a LENGTH_DEPENDENT_SCHEDULES schedule: `resume` says so in its own words."""
    saved_values = json.loads(from_stored(saved).to_json())
    current_values = json.loads(current.to_json())
    names = sorted((set(saved) & set(current_values)) - RESUMABLE_CHANGES)
    return [
        f"{name}: {saved_values.get(name)!r} -> {current_values.get(name)!r}"
        for name in names
        if saved_values.get(name) != current_values.get(name)
    ]
