"""Orbax checkpoints under WORKDIR/checkpoints (docs/training.md): save, and restore
against shapes and shardings built from the config, so on any topology.

A step's items: `model` (what to predict with: the EMA where kept), `train` (optimiser
state, step, dropout key; the raw weights when `model` is the EMA), `config` and `meta`
(JSON; the meta holds the dataset's info, the position in the data, the epoch's metrics
and the digests of checksums.py, checked wherever an item is read), and for a streamed
run `data` (grain's position, a file per process). A step that does not read back
exactly is damaged: a trainer moves it aside (resume.py), readers refuse it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import types
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vgg_jax import configuration
from vgg_jax.checksums import (
    data_digests,
    data_folder_digests,
    digest,
    json_digest,
    meta_digest,
    non_finite_leaves,
)

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
ITEMS = ("model", "train", "config", "meta")
OPTIONAL_ITEMS = ("data",)  # a streamed run's input position (grain's iterator state)
# Version of the meta item's layout. 1 (unversioned): the dataset's info under
# "dataset_info"; 2: under "dataset", with "schema": 2.
META_SCHEMA = 2


class IncompatibleCheckpointError(ValueError):
    """The workdir holds a checkpoint of a run with a different configuration."""


class NoCheckpointError(FileNotFoundError):
    """No usable checkpoint where one was expected."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint step cannot be read back as it was written."""

    def __init__(self, directory: str | os.PathLike, step: int, reason: str):
        super().__init__(f"checkpoint {directory}/{step} is damaged: {reason}")
        self.directory = str(directory)
        self.step = step
        self.reason = reason

    def naming_others(self, steps: tuple[int, ...] | list[int]) -> DamagedCheckpointError:
        """The same error, naming the other steps there that a reader may ask for."""
        others = [str(step) for step in steps if step != self.step]
        if not others:
            return self
        hint = f"; other steps there: {', '.join(others)} (ask for one with step=N, --step=N)"
        return DamagedCheckpointError(self.directory, self.step, self.reason + hint)


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
    # Orbax's message ends in the writer's, after "Failed to write" where TensorStore's.
    reason = str(error).strip().split("Failed to write")[-1].strip()
    return CheckpointWriteError(
        f"could not write a checkpoint in {manager.directory}: "
        f"{reason.splitlines()[-1][-200:] if reason else type(error).__name__}"
    )


class NonFiniteStateError(FloatingPointError):
    """The state to save holds NaN or infinite values; it is not saved."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def accuracy_of(metrics: dict[str, Any]) -> float:
    return metrics["test_accuracy"]


@dataclasses.dataclass
class BestTestAccuracy:
    """Orbax's BestN(n=1) by test accuracy. Steps without orbax's metrics (written by an
    older version) are ranked by the accuracy in their meta item, so that the best of an
    old run is not dropped at its first resume."""

    directory: str

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        filled = []  # orbax's PolicyCheckpointInfo is a protocol: step, time, metrics
        for info in checkpoints:
            metrics = self._stored(info.step) if info.metrics is None else info.metrics
            filled.append(types.SimpleNamespace(step=info.step, time=info.time, metrics=metrics))
        best = checkpoint_managers.BestN(
            get_metric_fn=accuracy_of, n=1, keep_checkpoints_without_metrics=False
        )
        return best.should_preserve(filled, context=context)

    def _stored(self, step: int) -> dict[str, float] | None:
        try:
            with open(os.path.join(self.directory, str(step), "meta", "metadata")) as f:
                accuracy = json.load(f).get("test_accuracy")
        except (OSError, ValueError, AttributeError):
            return None
        return None if accuracy is None else {"test_accuracy": float(accuracy)}


def create_manager(
    directory: str,
    keep: int = 3,
    async_save: bool = True,
    read_only: bool = False,
    array_handler: ocp.type_handlers.ArrayHandler | None = None,
) -> ocp.CheckpointManager:
    """A manager keeping the latest `keep` checkpoints plus the best by test accuracy.
    Orbax writes each step into a temporary folder and renames it when complete, so a
    save cut short by a crash never looks like a checkpoint. `array_handler`
    (`models.backend_tuning`'s) is registered process-wide, where orbax keeps its type
    handlers."""
    policy = checkpoint_managers.AnyPreservationPolicy(
        [checkpoint_managers.LatestN(n=max(1, keep)), BestTestAccuracy(str(directory))]
    )
    # A reader neither creates, cleans nor prunes anything (orbax's own read_only mode
    # would also do, but warns on every load).
    # Unfinished saves are removed here, synchronously: orbax's own clean-up runs in a
    # background thread that an early exit interrupts with a 40-line traceback.
    if not read_only and jax.process_index() == 0:
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    if array_handler is not None and not read_only:
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # orbax warns that the handler is replaced
        try:
            ocp.type_handlers.register_type_handler(jax.Array, array_handler, override=True)
        finally:
            absl_logger.setLevel(level)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy,
        # With `best_fn` set, orbax writes each step's metrics beside it (the
        # preservation policy above still decides what is kept): a resumed run then
        # knows the test accuracy of the steps an earlier run saved.
        best_fn=accuracy_of,
        best_mode="max",
        enable_async_checkpointing=async_save and not read_only,
        cleanup_tmp_directories=False,
        create=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=(*ITEMS, *OPTIONAL_ITEMS))


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved config as plain JSON values (tuples become lists)."""
    return json.loads(config.to_json())


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    config: ml_collections.ConfigDict,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Saves `state` at its step (asynchronously where the manager is async), with the
    digests of its items in `meta` and the `extra` items (the stream's position). Refuses
    a state with NaN or infinite values."""
    step = int(state.step)
    model, train = split_state(state)
    bad = non_finite_leaves({"model": model, "train": train})
    if bad:
        raise NonFiniteStateError(
            f"not saving step {step}: non-finite values in {', '.join(bad[:3])}"
        )
    config_json = config_to_json(config)
    digests = {"model": digest(model), "train": digest(train), "config": json_digest(config_json)}
    if "data" in (extra or {}):  # grain's CheckpointSave: the state its handler writes
        digests["data"] = data_digests(extra["data"].item.get_state())
    meta = {**meta, "digests": digests}
    meta["digests"]["meta"] = meta_digest(meta)
    # What the retention policy ranks the steps by (`best_step` reads the meta's).
    accuracy = meta.get("test_accuracy")
    metrics = None if accuracy is None else {"test_accuracy": float(accuracy)}
    check_writes(manager)  # the previous save's failure first, in one line
    args = ocp.args.Composite(
        model=ocp.args.StandardSave(model),
        train=ocp.args.StandardSave(train),
        config=ocp.args.JsonSave(config_json),
        meta=ocp.args.JsonSave(meta),
        **(extra or {}),
    )
    try:
        manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as error:  # noqa: BLE001 - whatever the writer raised
        raise _write_error(manager, error) from None


def split_state(state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state as the `model` and `train` items."""
    raw = state.model_variables()
    train = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
    if state.ema:
        return state.ema, {**train, "raw": raw}
    return raw, train


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shapes and dtypes of `tree` (arrays or ShapeDtypeStructs), placed with `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def read_json_item(manager: ocp.CheckpointManager, step: int, name: str) -> dict[str, Any]:
    """A JSON item of `step` as stored; DamagedCheckpointError where it cannot be read."""
    try:
        args = ocp.args.Composite(**{name: ocp.args.JsonRestore()})
        return manager.restore(step, args=args)[name]
    except Exception as error:  # noqa: BLE001 - a missing or garbled file, as orbax says it
        reason = f"its {name} item is unreadable ({_first_line(error)})"
        raise DamagedCheckpointError(manager.directory, step, reason) from None


def _check_digest(manager, step: int, name: str, expected, digest_of: Callable, value) -> None:
    """DamagedCheckpointError where `digest_of(value)` is not the digest recorded for item
    `name`; `expected` None (a step written before digests) passes."""
    if expected is not None and digest_of(value) != expected:
        reason = f"the {name!r} item fails its checksum"
        raise DamagedCheckpointError(manager.directory, step, reason)


def _first_line(error: BaseException) -> str:
    """`Type: first line` of an error's message. Orbax wraps a failed array read in a
    message that prints a TensorStore method's repr (`<bound method ...>`); the read's
    own error, its cause, says what failed."""
    text = str(error).strip()
    if "<bound method" in text or "See full TensorStore details" in text:
        cause = error.__cause__ or error.__context__
        if cause is not None:
            return _first_line(cause)
        text = text.split("See full TensorStore details")[0].split("<bound method")[0]
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def read_stored_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The config item of `step` as stored, checked against its digest in the meta."""
    saved = read_json_item(manager, step, "config")
    expected = read_meta(manager, step).get("digests", {}).get("config")
    _check_digest(manager, step, "config", expected, json_digest, saved)
    return saved


def read_config(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
    """The config stored with `step`, completed for this version of the package."""
    return configuration.from_stored(read_stored_config(manager, step))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The meta item of `step` in the current schema, checked against its own digest
    (where it has one)."""
    meta = read_json_item(manager, step, "meta")
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(manager.directory, step, "its meta item is no object")
    digests = meta.get("digests")
    expected = digests.get("meta") if isinstance(digests, dict) else None
    _check_digest(manager, step, "meta", expected, meta_digest, meta)
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


def check_data_item(manager: ocp.CheckpointManager, step: int, meta: dict[str, Any]) -> None:
    """The stream position files of `step` against their digests in its `meta`; every
    process checks every process's file, so that all reach the same verdict."""
    expected = meta.get("digests", {}).get("data")
    folder = os.path.join(str(manager.directory), str(step), "data")
    if expected is None or not os.path.isdir(folder):
        return
    try:
        _check_digest(manager, step, "data", sorted(expected), data_folder_digests, folder)
    except (OSError, ValueError) as error:
        reason = f"its data item is unreadable ({_first_line(error)})"
        raise DamagedCheckpointError(manager.directory, step, reason) from None


def _restore_verified(
    manager: ocp.CheckpointManager, step: int, items: dict[str, Any], meta: dict[str, Any]
) -> dict[str, Any]:
    """The named items restored against their abstract trees and checked against their
    digests in `meta`; DamagedCheckpointError where they do not read back exactly."""
    args = ocp.args.Composite(**{name: ocp.args.StandardRestore(t) for name, t in items.items()})
    try:
        restored = manager.restore(step, args=args)
    except IncompatibleCheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever orbax/tensorstore raise
        raise DamagedCheckpointError(
            manager.directory, step, f"unreadable ({_first_line(error)})"
        ) from None
    digests = meta.get("digests", {})
    for name in items:
        _check_digest(manager, step, name, digests.get(name), digest, restored[name])
    return restored


def restore_model(
    manager: ocp.CheckpointManager, step: int, abstract_variables: Any
) -> dict[str, Any]:
    """Params and BN statistics only (what a predictor needs), checked."""
    items = {"model": abstract_variables}
    return _restore_verified(manager, step, items, read_meta(manager, step))["model"]


def restore_state(
    manager: ocp.CheckpointManager, step: int, state: Any, sharding
) -> tuple[Any, dict[str, Any]]:
    """`state` (a template) filled from checkpoint `step`, checked, and the step's meta."""
    meta = read_meta(manager, step)
    model, train = split_state(state)
    items = {"model": abstract_like(model, sharding), "train": abstract_like(train, sharding)}
    restored = _restore_verified(manager, step, items, meta)
    check_data_item(manager, step, meta)
    model, train = restored["model"], restored["train"]
    raw = train.get("raw", model)
    restored_state = state.replace(
        **raw,
        opt_state=train["opt_state"],
        step=train["step"],
        rng=train["rng"],
        ema=model if state.ema else {},
    )
    return restored_state, meta


def missing_items(manager: ocp.CheckpointManager, step: int) -> list[str]:
    folder = os.path.join(str(manager.directory), str(step))
    return [item for item in ITEMS if not os.path.isdir(os.path.join(folder, item))]


@dataclasses.dataclass(frozen=True)
class Located:
    """Where a checkpoint is: its manager folder and the step to read."""

    directory: str
    step: int
    steps: tuple[int, ...] = ()  # every usable step there, newest first


def locate(path: str, step: int | str = "latest") -> Located:
    """A workdir, checkpoints folder or step folder, and 'latest', 'best' or a step
    number, resolved to a checkpoint that can be read."""
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
    try:
        every = sorted(manager.all_steps(), reverse=True)
        if not every:
            raise NoCheckpointError(f"no checkpoint in {directory}")
        complete = tuple(s for s in every if not missing_items(manager, s))
        if step == "latest":
            chosen = every[0]
        elif step == "best":
            chosen = best_step(manager, every)
        else:
            chosen = int(step)
            if chosen not in every:
                raise NoCheckpointError(
                    f"no checkpoint for step {chosen} in {directory}: {list(complete)}"
                )
    finally:
        manager.close()
    missing = missing_items(manager, chosen)
    if missing:  # a reader never falls back silently to another step than the one asked
        damaged = DamagedCheckpointError(directory, chosen, f"missing {', '.join(missing)}")
        raise damaged.naming_others(complete)
    return Located(directory, chosen, complete)


def best_step(manager: ocp.CheckpointManager, steps: list[int]) -> int:
    """The step with the highest recorded test accuracy (the latest if none has one)."""
    scored = []
    for step in steps:
        try:
            accuracy = read_meta(manager, step).get("test_accuracy")
        except (OSError, ValueError, DamagedCheckpointError) as error:  # not a candidate
            logger.warning("skipping checkpoint step %d: %s", step, error)
            continue
        if accuracy is not None:
            scored.append((accuracy, step))
    return max(scored)[1] if scored else steps[0]
