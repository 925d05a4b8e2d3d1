"""Which values each configuration field accepts and which combinations work: every
problem of a config is found before JAX loads, and reported at once by `validate`."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from vgg_jax import spec
from vgg_jax.configuration import (
    AUGMENTATIONS,
    CONV_IMPLS,
    DEVICE_AUGMENTATIONS,
    DTYPES,
    INPUTS,
    LENGTH_DEPENDENT_SCHEDULES,
    MAX_IMAGE_SIZE,
    SCHEDULES,
    SYNTHETIC_SPLITS,
    ConfigError,
)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda value: (
        None if value in choices else f"{value!r} is not one of {', '.join(choices)}"
    )


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
    return f"{value!r} is not 'paddle', 'none' or a rate in [0, 1)"


def _stages(value):
    if value is None:
        return None
    ok = (
        isinstance(value, tuple)
        and value
        and all(
            isinstance(block, tuple) and block and all(isinstance(c, int) and c > 0 for c in block)
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
    source, colon, _ = value.partition(":")
    if colon and source in {name.partition(":")[0] for name in spec.PRETRAINED}:
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
    if NON_NEGATIVE(value) is None and (not isinstance(value, int) or value >= 2**32):
        return f"{value!r} is not an integer in [0, 2**32 - 1] (grain takes 32-bit seeds)"
    return NON_NEGATIVE(value)


def _nonempty(value):
    return None if isinstance(value, str) and value else "must be a non-empty name"


def _host_port(value):
    if not isinstance(value, str):
        return f"{value!r} is not HOST:PORT"
    host, colon, port = value.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{value!r} is not HOST:PORT (a port 1-65535), e.g. 10.0.0.1:1234"
    return None


def _seconds(value):
    # JAX takes its timeouts as whole seconds.
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{value!r} is not a whole number"
    return None if value >= 1 else f"{value!r} is below 1"


POSITIVE = _number(1)
FRACTION = _number(0, 1)
NON_NEGATIVE = _number(0)

CHECKS: dict[str, Callable[[Any], str | None]] = {
    "model": _one_of(tuple(spec.STAGES)),
    "stages": _stages,
    "width": _number(0, low_open=True),
    "conv_dropout": _conv_dropout,
    "head": _one_of(tuple(spec.HEADS)),
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
    "distributed_init_timeout_seconds": _seconds,
    "distributed_heartbeat_timeout_seconds": _seconds,
    "log_every_steps": POSITIVE,
    "checkpoint_every_epochs": POSITIVE,
    "keep_checkpoints": POSITIVE,
}


def problems(config: ml_collections.ConfigDict, device_count: int | None = None) -> list[str]:
    """Every problem of `config`, one 'field: what is wrong' line each."""
    found = []
    for field, check in CHECKS.items():
        value = config[field]
        new_name = spec.RENAMED.get(field, {}).get(value) if isinstance(value, str) else None
        message = f"{value!r} is now called {new_name!r}" if new_name else check(value)
        if message is not None:
            found.append(f"{field}: {message}")
    return found + _cross_field_problems(config, device_count)


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
