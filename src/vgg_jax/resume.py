"""What rerunning a training command continues from (docs/training.md): the newest
intact checkpoint of the workdir, damaged steps moved aside, if it belongs to the run
asked for."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from vgg_jax import checkpoint, configuration
from vgg_jax.data.info import DatasetInfo

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    step: int
    meta: dict[str, Any]
    saved_config: dict[str, Any]


def find_resume_point(manager, config: ml_collections.ConfigDict) -> ResumePoint | None:
    """The newest complete step with readable config and meta, after checking that it
    belongs to this run; None if the workdir holds none."""
    for step in usable_steps(manager, move_damaged=True):
        try:
            saved = checkpoint.read_stored_config(manager, step)
            meta = checkpoint.read_meta(manager, step)
        except checkpoint.IncompatibleCheckpointError:
            raise
        except checkpoint.DamagedCheckpointError as error:
            quarantine(manager, step, error.reason)
            continue
        except (OSError, ValueError, KeyError) as error:
            quarantine(manager, step, f"unreadable config or meta ({error})")
            continue
        check_same_run(saved, config, str(manager.directory))
        return ResumePoint(step, meta, saved)
    return None


def check_same_run(saved: dict[str, Any], config: ml_collections.ConfigDict, where: str):
    """The stored config against this one: what may not change, and `num_epochs` where
    it shapes the schedule."""
    differences = configuration.resume_differences(saved, config)
    if differences:
        raise checkpoint.IncompatibleCheckpointError(
            f"{where} holds a run with a different config ({'; '.join(differences)}): "
            "rerun with the same settings to resume, or use a new --workdir"
        )
    before = saved.get("num_epochs", config.num_epochs)
    if before != config.num_epochs and config.schedule in configuration.LENGTH_DEPENDENT_SCHEDULES:
        raise checkpoint.IncompatibleCheckpointError(
            f"{where} holds a run of {before} epochs whose {config.schedule} schedule is "
            f"shaped by that length; resuming it with num_epochs={config.num_epochs} would "
            f"make the learning rate jump: rerun with --config.num_epochs={before}, or "
            "train longer from a new --workdir"
        )


def check_same_data(
    point: ResumePoint, info: DatasetInfo, steps_per_epoch: int, where: str
) -> None:
    """The dataset's classes and the steps per epoch must be those of the checkpoint."""
    saved_classes = tuple(point.meta.get("dataset", {}).get("class_names", info.class_names))
    if saved_classes != info.class_names:
        added = sorted(set(info.class_names) - set(saved_classes))
        removed = sorted(set(saved_classes) - set(info.class_names))
        raise checkpoint.IncompatibleCheckpointError(
            f"{where} was trained on other classes: the dataset's classes changed "
            f"(added: {', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'}"
            f"{'; reordered' if not (added or removed) else ''}): use a new --workdir"
        )
    if point.meta["steps_per_epoch"] != steps_per_epoch:
        raise checkpoint.IncompatibleCheckpointError(
            f"{where} was written with {point.meta['steps_per_epoch']} steps per epoch, this "
            f"run has {steps_per_epoch}: the dataset changed; use a new --workdir"
        )


def restore_newest_intact(manager, point: ResumePoint, state: Any, sharding):
    """The state of the newest step at or before `point` that reads back exactly, and
    that step's meta; (state unchanged, None) when every step is damaged."""
    for step in [s for s in usable_steps(manager) if s <= point.step]:
        try:
            restored, meta = checkpoint.restore_state(manager, step, state, sharding)
        except checkpoint.DamagedCheckpointError as error:
            quarantine(manager, step, error.reason)
            continue
        logger.info(
            "resuming from %s/%d: epoch %d, step %d of %d",
            manager.directory,
            step,
            meta["epoch"] + 1,
            meta["step_in_epoch"],
            meta["steps_per_epoch"],
        )
        return restored, meta
    logger.warning("no intact checkpoint left in %s: training from the start", manager.directory)
    return state, None


def quarantine(manager: ocp.CheckpointManager, step: int, reason: str) -> None:
    """Moves a damaged step aside as `<step>.damaged`, kept for inspection, so that the
    run can save that step anew."""
    directory = str(manager.directory)
    target = os.path.join(directory, f"{step}.damaged")
    suffix = 1
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(directory, f"{step}.damaged-{suffix}")
    if jax.process_index() == 0:  # the processes of one run share the folder
        os.rename(os.path.join(directory, str(step)), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"quarantine {step}")
    logger.warning(
        "checkpoint %s/%d is damaged (%s): moved aside to %s", directory, step, reason, target
    )
    manager.reload()


def usable_steps(manager: ocp.CheckpointManager, move_damaged: bool = False) -> list[int]:
    """Finished steps with every item, newest first; the others are skipped with a
    warning or, with `move_damaged` (a trainer), moved aside."""
    steps = []
    for step in sorted(manager.all_steps(), reverse=True):
        missing = ", ".join(checkpoint.missing_items(manager, step))
        if not missing:
            steps.append(step)
        elif move_damaged:
            quarantine(manager, step, f"missing {missing}")
        else:
            folder = f"{manager.directory}/{step}"
            logger.warning("skipping checkpoint %s: incomplete (missing %s)", folder, missing)
    return steps
