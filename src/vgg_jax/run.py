"""A training run's bookkeeping, apart from its steps: what the epoch loop carries
(`Run`, made by `train.setup`), and how a run saves, logs, checks and stops."""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from vgg_jax import checkpoint, data
from vgg_jax.metrics_log import MetricsLog
from vgg_jax.preemption import Preempted, PreemptionGuard
from vgg_jax.workdir_lock import WorkdirLock

logger = logging.getLogger(__name__)


class DivergedError(FloatingPointError):
    """The training loss became NaN or infinite; nothing after it was saved."""


@dataclasses.dataclass
class Run:
    """Everything the epoch loop needs, made once by `train.setup`."""

    config: ml_collections.ConfigDict
    manager: Any  # orbax CheckpointManager
    log: MetricsLog
    input: data.Input
    learning_rate_fn: optax.Schedule
    train_fn: Callable[..., Any]
    eval_fn: Callable[..., Any]
    partial_sums: dict[str, float] | None  # metric sums of a resumed, unfinished epoch
    wait_each_step: bool = False  # the backend's step pacing (models.backend_tuning)
    lock: WorkdirLock | None = None  # held by process 0 for the whole run

    @property
    def steps_per_epoch(self) -> int:
        return self.input.steps_per_epoch

    def save(self, state: Any, epoch: int, step_in_epoch: int, record=None, sums=None) -> None:
        """Saves `state` with where it is in the data (`epoch` finished epochs plus
        `step_in_epoch` steps) and, mid-epoch, the epoch's partial metric sums."""
        meta = {
            "schema": checkpoint.META_SCHEMA,
            "dataset": self.input.info.to_json(),
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
        }
        if record is not None:
            meta.update(test_accuracy=record["test_accuracy"], record=record)
        if sums is not None:
            meta["partial_train_sums"] = {k: float(v) for k, v in jax.device_get(sums).items()}
        extra = self.input.checkpoint_items()
        checkpoint.save(self.manager, state, self.config, meta, extra=extra)

    def close(self) -> None:
        """Waits for the last save, then closes the manager and the log, and frees the
        workdir."""
        try:
            checkpoint.check_writes(self.manager, wait=True)
            self.manager.close()
            self.log.close()
            self.input.close()
        finally:
            if self.lock:
                self.lock.release()

    def progress_bar(self, epoch: int, done: int) -> tqdm:
        config = self.config
        return tqdm(
            total=self.steps_per_epoch * config.batch_size,
            initial=done * config.batch_size,
            desc=f"epoch {epoch + 1}/{config.num_epochs}",
            unit="img",
            unit_scale=True,
            leave=False,
            disable=not config.progress_bar or jax.process_index() != 0,
        )

    def check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            steps = self.manager.all_steps()
            last = f"the last checkpoint is step {max(steps)}" if steps else "nothing was saved"
            raise DivergedError(
                f"training diverged: the train loss is {loss} by step {step}; {last}. Try a "
                f"lower learning_rate (now {self.config.learning_rate}), a warm-up "
                "(warmup_epochs) or gradient clipping (grad_clip_norm)"
            )

    def log_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's log line, and its record in metrics.jsonl and TensorBoard."""
        top5 = record.get("test_top5_accuracy")
        top5 = "" if top5 is None else f" top-5 {top5:.4f}"
        logger.info(
            f"epoch {record['epoch']}/{self.config.num_epochs}  train loss "
            f"{record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  test loss "
            f"{record['test_loss']:.4f} acc {record['test_accuracy']:.4f}{top5}  lr "
            f"{record['learning_rate']:.5g}  {record['epoch_seconds']:.1f}s  (input wait "
            f"{100 * record['input_wait_fraction']:.0f}%)"
        )
        self.log.write(record)

    def stop(self, state: Any, guard: PreemptionGuard, where: str) -> None:
        """Closes the run and raises `Preempted`: the checkpoint is saved."""
        self.close()
        raise Preempted(
            guard.signal_number,
            f"stopped by signal {guard.signal_number} {where} (step {int(state.step)}); "
            f"checkpoint saved in {self.manager.directory}; rerun the same command to resume",
        )


def stop_requested(guard: PreemptionGuard, config, step: int, index: int | None = None) -> bool:
    """Whether to stop after training step `step` (`index` in its epoch) or, with
    `index` None, after this epoch. Several processes must stop at the same step: a
    SIGTERM to any of them reaches all through JAX's preemption service, checked every
    step; other signals (Ctrl-C) are shared once per logging interval and at epoch ends
    (one tiny collective)."""
    if jax.process_count() == 1:
        return guard.requested
    from jax.experimental import multihost_utils

    if index is not None:
        if multihost_utils.reached_preemption_sync_point(step):
            guard.signal_number = guard.signal_number or signal.SIGTERM
            return True
        if (index + 1) % config.log_every_steps:
            return False
    flags = multihost_utils.process_allgather(np.int32(guard.requested))
    stop = bool(np.asarray(flags).any())
    if stop and not guard.requested:
        guard.signal_number = signal.SIGINT  # another process's Ctrl-C
    return stop
