"""Config -> learning-rate schedule and optax optimiser."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vgg_jax import spec
from vgg_jax.configuration import SCHEDULES


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """The schedule named by `config.schedule`, as a function of the step.

    discexp:  lr * lr_decay_rate ** floor(samples_seen / lr_decay_samples)  (PaddlePaddle's)
    multistep: lr * lr_decay_rate ** (number of `lr_boundaries_epochs` passed)
    cosine:   linear warm-up, then cosine decay to 0 at the last step
    onecycle: linear warm-up to lr, then linear decay to 0 at the last step
    constant: lr
    """
    base_lr = config.learning_rate
    total_steps = max(1, config.num_epochs * steps_per_epoch)
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    name = config.schedule
    if name == "constant":
        return optax.constant_schedule(base_lr)
    if name == "discexp":
        rate, batch_size = config.lr_decay_rate, config.batch_size
        decay_samples = config.lr_decay_samples
        return lambda step: base_lr * rate ** jnp.floor(step * batch_size / decay_samples)
    if name == "multistep":
        boundaries = {
            int(round(epoch * steps_per_epoch)): config.lr_decay_rate
            for epoch in config.lr_boundaries_epochs
        }
        return optax.piecewise_constant_schedule(base_lr, boundaries)
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, base_lr, warmup_steps, total_steps, end_value=0.0
        )
    if name == "onecycle":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, base_lr, max(1, warmup_steps)),
                optax.linear_schedule(base_lr, 0.0, max(1, total_steps - warmup_steps)),
            ],
            [max(1, warmup_steps)],
        )
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """Momentum SGD. Coupled L2 (`config.l2`) is added to the gradient *before* momentum,
    as Paddle's L2Regularization and PyTorch's SGD(weight_decay=...) do; decoupled weight
    decay (`config.weight_decay`) after it, scaled by the learning rate. For fine-tuning,
    `config.freeze` layers get no updates (nor momentum state) and the other conv layers'
    updates are scaled by `config.backbone_lr_factor` (`param_groups`)."""
    parts = []
    if config.l2:
        parts.append(optax.add_decayed_weights(config.l2))
    parts.append(optax.trace(decay=config.momentum, nesterov=config.nesterov))
    if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    clip = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    if config.freeze == "none" and config.backbone_lr_factor == 1.0:
        return optax.chain(*clip, *parts)  # one group: the layout of earlier checkpoints
    labels = functools.partial(param_groups, freeze=config.freeze)
    groups = {
        "head": optax.chain(*parts),
        "backbone": optax.chain(*parts, optax.scale(config.backbone_lr_factor)),
        "frozen": optax.set_to_zero(),
    }
    if clip:
        # Frozen layers' gradients are zeroed before the global norm is taken.
        zero_frozen = {"head": optax.identity(), "backbone": optax.identity()}
        zero_frozen["frozen"] = optax.set_to_zero()
        clip = [optax.multi_transform(zero_frozen, labels), *clip]
    return optax.chain(*clip, optax.multi_transform(groups, labels))


def param_groups(params: Any, freeze: str = "none") -> Any:
    """The optimiser group of every parameter: 'frozen' (conv blocks that `freeze`
    covers, their BN included), 'backbone' (the other conv blocks) or 'head'."""
    named = {"none": 0, "features": math.inf}  # else 'blockN': the first N blocks
    through = named[freeze] if freeze in named else int(freeze.removeprefix("block"))

    def group(path: tuple, _) -> str:
        block = spec.block_of(path[0].key)  # the leaf's layer
        if block is None:
            return "head"
        return "frozen" if block <= through else "backbone"

    return jax.tree_util.tree_map_with_path(group, params)
