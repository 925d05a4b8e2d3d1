"""Orbax checkpoints under WORKDIR/checkpoints: save, resume, restore on any topology.

Each step folder holds four items, five for a streamed run:
  model   the params and BN statistics to predict with (the EMA when training keeps one)
  train   optimiser state, step, dropout key (and the raw weights when `model` is the EMA)
  config  the resolved config, as JSON (read back through configuration.from_stored)
  meta    JSON, schema META_SCHEMA: the dataset's info (class names, normalisation,
          image size), the epoch and position in it, the epoch's metrics, and a SHA-256
          digest of every array of `model` and `train`, checked on every restore
  data    (streamed runs) the grain iterator's position, one JSON file per process
Nothing is pickled. Arrays are restored against shapes and shardings built here from the
config, so a checkpoint written on 8 GPUs restores on 1 CPU without knowing its origin.
A step that cannot be read back exactly (an item missing, a chunk or manifest deleted or
truncated, a digest that does not match) is damaged: a trainer moves it aside as
`<step>.damaged` and resumes from the newest intact one; readers refuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vgg_jax import configuration, cpu

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
ITEMS = ("model", "train", "config", "meta")
OPTIONAL_ITEMS = ("data",)  # a streamed run's input position (grain's iterator state)
# Version of the meta item's layout. 1 (unversioned): the dataset's info under
# "dataset_info"; 2: under "dataset", with "schema": 2.
META_SCHEMA = 2
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


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a run with a different configuration."""


class NoCheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint step cannot be read back as it was written."""

    def __init__(self, directory: str, step: int, reason: str):
        super().__init__(f"checkpoint {directory}/{step} is damaged: {reason}")
        self.step = step
        self.reason = reason


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount, ...)."""


def check_writes(manager: ocp.CheckpointManager, wait: bool = False) -> None:
    """Raises CheckpointWriteError, in one line, if a background save failed."""
    try:
        if wait:
            manager.wait_until_finished()
        manager.check_for_errors()
    except Exception as error:  # noqa: BLE001 - orbax re-raises the writer's error
        raise _write_error(manager, error) from None


def _write_error(manager: ocp.CheckpointManager, error: Exception) -> CheckpointWriteError:
    text = str(error).strip()
    reason = text.split("Failed to write")[-1].strip() if "Failed to write" in text else text
    return CheckpointWriteError(
        f"could not write a checkpoint in {manager.directory}: "
        f"{reason.splitlines()[-1][-200:] if reason else type(error).__name__}"
    )


class NonFiniteStateError(FloatingPointError):
    """The state to save holds NaN or infinite values; it is not saved."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def create_manager(
    directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
    """A manager keeping the latest `keep` checkpoints plus the best by test accuracy.

    Orbax writes each step into a temporary folder and renames it when complete, so a
    save cut short by a crash never looks like a checkpoint."""
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=max(1, keep)),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics["test_accuracy"],
                reverse=False,
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    # A reader neither creates, cleans nor prunes anything (orbax's own read_only mode
    # would also do, but warns on every load).
    # Unfinished saves are removed here, synchronously: orbax's own clean-up runs in a
    # background thread that an early exit interrupts with a 40-line traceback.
    if not read_only and jax.process_index() == 0:
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    if not read_only and cpu.several_cpu_devices():
        cpu.save_replicated_arrays_whole()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy,
        enable_async_checkpointing=async_save and not read_only,
        cleanup_tmp_directories=False,
        create=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=(*ITEMS, *OPTIONAL_ITEMS))


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved config as plain JSON values (tuples become lists)."""
    return json.loads(config.to_json())


def _host_leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    """(path, host array) of every leaf; a replicated array is read from this process."""
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)
        leaves.append((jax.tree_util.keystr(path), np.asarray(jax.device_get(leaf))))
    return leaves


def digest(tree: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes, in tree order."""
    hasher = hashlib.sha256()
    for path, array in _host_leaves(tree):
        hasher.update(f"{path}|{array.dtype}|{array.shape}|".encode())
        hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()


def non_finite_leaves(tree: Any) -> list[str]:
    return [
        path
        for path, array in _host_leaves(tree)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all()
    ]


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    config: ml_collections.ConfigDict,
    meta: dict[str, Any],
    test_accuracy: float | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Saves `state` at its step (asynchronously where the manager is async), with the
    digests of its arrays in `meta` and the `extra` items (the stream's position).
    Refuses a state with NaN or infinite values."""
    step = int(state.step)
    model, train = split_state(state)
    bad = non_finite_leaves({"model": model, "train": train})
    if bad:
        raise NonFiniteStateError(
            f"not saving step {step}: non-finite values in {', '.join(bad[:3])}"
        )
    meta = {**meta, "digests": {"model": digest(model), "train": digest(train)}}
    metrics = None if test_accuracy is None else {"test_accuracy": float(test_accuracy)}
    check_writes(manager)  # the previous save's failure first, in one line
    args = ocp.args.Composite(
        model=ocp.args.StandardSave(model),
        train=ocp.args.StandardSave(train),
        config=ocp.args.JsonSave(config_to_json(config)),
        meta=ocp.args.JsonSave(meta),
        **(extra or {}),
    )
    try:
        manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as error:  # noqa: BLE001 - whatever the writer raised
        raise _write_error(manager, error) from None


def split_state(state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state as the `model` and `train` items."""
    raw = {"params": state.params, "batch_stats": state.batch_stats}
    train = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
    if state.ema:
        return state.ema, {**train, "raw": raw}
    return raw, train


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shapes and dtypes of `tree` (arrays or ShapeDtypeStructs), placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def read_json_item(manager: ocp.CheckpointManager, step: int, name: str) -> dict[str, Any]:
    return manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]


def read_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config stored with `step`, completed for this version of the package."""
    return configuration.from_stored(read_json_item(manager, step, "config"))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The meta item of `step` in the current schema, whatever schema it was written in."""
    meta = read_json_item(manager, step, "meta")
    schema = meta.get("schema", 1)
    if schema == 1:
        meta = {**meta, "schema": META_SCHEMA}
        if "dataset_info" in meta:
            meta["dataset"] = meta.pop("dataset_info")
    elif schema != META_SCHEMA:
        raise IncompatibleCheckpointError(
            f"{manager.directory}/{step} has meta schema {schema}; this version of vgg-jax "
            f"reads schemas 1 to {META_SCHEMA}: upgrade vgg-jax"
        )
    return meta


def _restore_verified(manager: ocp.CheckpointManager, step: int, items: dict[str, Any]):
    """Restores the named items against their abstract trees and checks each one's
    digest; any failure to read them back exactly raises DamagedCheckpointError."""
    directory = str(manager.directory)
    try:
        digests = read_meta(manager, step).get("digests", {})
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(tree) for name, tree in items.items()}
            ),
        )
    except (IncompatibleCheckpointError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - whatever orbax/tensorstore raise
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise DamagedCheckpointError(
            directory, step, f"unreadable ({type(error).__name__}: {reason})"
        ) from None
    for name in items:
        if name in digests and digest(restored[name]) != digests[name]:
            raise DamagedCheckpointError(directory, step, f"the {name!r} item fails its checksum")
    return restored


def restore_model(
    manager: ocp.CheckpointManager, step: int, abstract_variables: Any
) -> dict[str, Any]:
    """Params and BN statistics only (what a predictor needs), checked."""
    return _restore_verified(manager, step, {"model": abstract_variables})["model"]


def restore_state(manager: ocp.CheckpointManager, step: int, state: Any, sharding) -> Any:
    """`state` (a template with the right structure) filled from checkpoint `step`,
    checked."""
    model, train = split_state(state)
    restored = _restore_verified(
        manager,
        step,
        {"model": abstract_like(model, sharding), "train": abstract_like(train, sharding)},
    )
    model, train = restored["model"], restored["train"]
    raw = train.get("raw", model)
    return state.replace(
        params=raw["params"],
        batch_stats=raw["batch_stats"],
        opt_state=train["opt_state"],
        step=train["step"],
        rng=train["rng"],
        ema=model if state.ema else {},
    )


def quarantine(manager: ocp.CheckpointManager, step: int, reason: str) -> None:
    """Moves a damaged step aside as `<step>.damaged` (kept for inspection, never read
    again) so that the run can save that step anew; one warning says so."""
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
    """Finished checkpoint steps, newest first. A step folder missing an item (a copy
    cut short, a half-deleted folder) is skipped with a warning or, with
    `move_damaged` (a trainer), moved aside."""
    steps = []
    for step in sorted(manager.all_steps(), reverse=True):
        folder = os.path.join(str(manager.directory), str(step))
        missing = [item for item in ITEMS if not os.path.isdir(os.path.join(folder, item))]
        if not missing:
            steps.append(step)
        elif move_damaged:
            quarantine(manager, step, f"missing {', '.join(missing)}")
        else:
            logger.warning(
                "skipping checkpoint %s: incomplete (missing %s)", folder, ", ".join(missing)
            )
    return steps


def config_differences(saved: dict[str, Any], current: ml_collections.ConfigDict) -> list[str]:
    """'field: saved -> current' for every field that matters to resuming. Fields that
    only one side has (added or removed in a later version) are not compared; values
    renamed since are compared under their new names."""
    saved_values = config_to_json(configuration.from_stored(saved))
    current_values = config_to_json(current)
    names = sorted((set(saved) & set(current_values)) - RESUMABLE_CHANGES)
    return [
        f"{name}: {saved_values.get(name)!r} -> {current_values.get(name)!r}"
        for name in names
        if saved_values.get(name) != current_values.get(name)
    ]


def check_compatible(saved: dict[str, Any], current: ml_collections.ConfigDict, where: str):
    differences = config_differences(saved, current)
    if differences:
        raise IncompatibleCheckpointError(
            f"{where} holds a run with a different config ({'; '.join(differences)}): "
            "rerun with the same settings to resume, or use a new --workdir"
        )


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a checkpoint is: its manager folder and the step to read."""

    directory: str
    step: int
    steps: tuple[int, ...] = ()  # every usable step there, newest first


def locate(path: str, step: int | str = "latest") -> Located:
    """Resolves a workdir, a checkpoints folder or one step's folder, and 'latest',
    'best' or a step number, to a checkpoint that can be read."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise NoCheckpointError(f"{path} does not exist")
    if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
        directory = os.path.join(path, CHECKPOINT_SUBDIR)
    elif os.path.isdir(os.path.join(path, "model")) and os.path.basename(path).isdigit():
        directory, step = os.path.dirname(path), int(os.path.basename(path))
    else:
        directory = path
    manager = create_manager(directory, read_only=True)
    steps = usable_steps(manager)
    if not steps:
        raise NoCheckpointError(f"no checkpoint in {directory}")
    if step == "latest":
        chosen = steps[0]
    elif step == "best":
        chosen = best_step(manager, steps)
    else:
        chosen = int(step)
        if chosen not in steps:
            raise NoCheckpointError(f"no checkpoint for step {chosen} in {directory}: {steps}")
    manager.close()
    return Located(directory, chosen, tuple(steps))


def best_step(manager: ocp.CheckpointManager, steps: list[int]) -> int:
    """The step with the highest recorded test accuracy (the latest if none has one)."""
    scored = []
    for step in steps:
        try:
            accuracy = read_meta(manager, step).get("test_accuracy")
        except (OSError, ValueError) as error:  # an unreadable meta item: not a candidate
            logger.warning("skipping checkpoint step %d: unreadable meta (%s)", step, error)
            continue
        if accuracy is not None:
            scored.append((accuracy, step))
    return max(scored)[1] if scored else steps[0]
