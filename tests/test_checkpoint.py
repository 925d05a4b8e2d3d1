"""Checkpoints: exact resume, preemption, restore on another topology, bad folders."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, smoke_training_command

from vgg_jax import checkpoint, configuration, inference, train
from vgg_jax.metrics_log import read_metrics
from vgg_jax.preemption import Preempted


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


class SignalAfter:
    """A PreemptionGuard stand-in that 'receives SIGTERM' after a number of polls."""

    def __init__(self, polls: int):
        self.polls = polls
        self.signal_number = signal.SIGTERM

    @property
    def requested(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


@pytest.mark.slow
def test_stopped_mid_epoch_then_resumed_equals_uninterrupted(tiny_config, tmp_path, monkeypatch):
    # Everything a resume must carry at once (one run of each kind: each new setting is
    # a train step of its own to compile): dropout keys, data order and augmentation,
    # the EMA of the weights; flip-TTA evaluation on top.
    tiny_config.num_epochs = 3
    tiny_config.conv_dropout = "0.2"
    tiny_config.augment = "crop_flip"
    tiny_config.ema_decay = 0.9
    tiny_config.eval_flip_tta = True
    uninterrupted = train.train_and_evaluate(tiny_config, str(tmp_path / "a"))

    # 8 steps per epoch: stop after 13 steps (epoch 2, step 5), then rerun.
    monkeypatch.setattr(train, "PreemptionGuard", lambda: SignalAfter(13))
    with pytest.raises(Preempted) as stopped:
        train.train_and_evaluate(tiny_config, str(tmp_path / "b"))
    assert stopped.value.exit_code == 0 and "rerun the same command" in str(stopped.value)
    assert [r["epoch"] for r in read_metrics(tmp_path / "b")] == [1]
    monkeypatch.undo()
    resumed = train.train_and_evaluate(tiny_config, str(tmp_path / "b"))

    assert int(resumed.step) == int(uninterrupted.step) == 24
    assert_trees_equal(resumed.params, uninterrupted.params)
    assert_trees_equal(resumed.batch_stats, uninterrupted.batch_stats)
    assert_trees_equal(resumed.opt_state, uninterrupted.opt_state)
    assert_trees_equal(resumed.ema, uninterrupted.ema)
    records = read_metrics(tmp_path / "b")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["test_accuracy"] == read_metrics(tmp_path / "a")[-1]["test_accuracy"]
    assert 0 <= records[-1]["test_accuracy_flip_tta"] <= 1
    # The predictor uses the EMA weights, which differ from the raw ones.
    predictor = inference.load(tmp_path / "b")
    assert_trees_equal(predictor.variables, uninterrupted.ema)
    kernel = uninterrupted.params["conv1_1"]["kernel"]
    assert not np.array_equal(kernel, uninterrupted.ema["params"]["conv1_1"]["kernel"])


@pytest.mark.slow
def test_incompatible_config_in_the_workdir_is_refused(tiny_config, tmp_path):
    train.train_and_evaluate(tiny_config, str(tmp_path))
    tiny_config.width = 0.5
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"width: 1.0 -> 0.5"):
        train.train_and_evaluate(tiny_config, str(tmp_path))


@pytest.mark.slow
def test_keeps_the_latest_checkpoints_and_the_best(tiny_config, tmp_path):
    state = train.train_and_evaluate(tiny_config, str(tmp_path))
    manager = checkpoint.create_manager(str(tmp_path / "ckpt"), keep=2, async_save=False)
    for step, accuracy in zip(range(1, 6), [0.5, 0.9, 0.6, 0.7, 0.65], strict=True):
        stepped = state.replace(step=step)
        checkpoint.save(manager, stepped, tiny_config, {"test_accuracy": accuracy})
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 4, 5]
    assert checkpoint.locate(str(tmp_path / "ckpt"), "best").step == 2
    assert checkpoint.locate(str(tmp_path / "ckpt"), "latest").step == 5
    manager.close()


@pytest.mark.slow
def test_a_step_missing_items_is_refused_naming_the_others(tiny_config, tmp_path):
    # Orbax renames a step's folder only once it is complete: a finished step missing
    # items was damaged since. A reader says so rather than quietly use an older step.
    train.train_and_evaluate(tiny_config, str(tmp_path))
    broken = tmp_path / "checkpoints" / "999"
    (broken / "model").mkdir(parents=True)
    (broken / "_CHECKPOINT_METADATA").write_text("{}")
    message = r"999 is damaged: missing train, config, meta; other steps there: 16, 8"
    with pytest.raises(checkpoint.DamagedCheckpointError, match=message):
        inference.load(tmp_path)
    assert inference.load(tmp_path, step=16).step == 16


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.NoCheckpointError, match="no checkpoint"):
        inference.load(tmp_path)
    with pytest.raises(checkpoint.NoCheckpointError, match="does not exist"):
        inference.load(tmp_path / "missing")


RESTORE_ON_ONE_DEVICE = """
import sys, jax, numpy as np, vgg_jax
assert jax.device_count() == 1, jax.devices()
model = vgg_jax.load(sys.argv[1])
images = np.load(sys.argv[2])
np.save(sys.argv[3], model.predict(images))
print(model.step, len(model.class_names))
"""


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_in_a_1_device_process(tiny_config, tmp_path):
    assert jax.device_count() == 8
    train.train_and_evaluate(tiny_config, str(tmp_path))
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    here = inference.load(tmp_path).predict(images)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RESTORE_ON_ONE_DEVICE,
            str(tmp_path),
            str(tmp_path / "images.npy"),
            str(tmp_path / "probs.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["16", "10"]
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), here, rtol=1e-5, atol=1e-6)


def _train_command(workdir):
    """The smoke command of tests/conftest.py's smoke_run (4 epochs of 32 steps): its
    finished run is the uninterrupted reference, and its programs are compiled."""
    return smoke_training_command(workdir, "--config.progress_bar=False")


@pytest.mark.slow
def test_sigterm_saves_then_the_same_command_resumes(tmp_path, smoke_run):
    command = _train_command(tmp_path)
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    # Signal as soon as set-up is logged: the guard is already in place, so the run
    # takes one step, saves it and exits 0.
    stderr = []
    for line in process.stderr:
        stderr.append(line)
        if "steps of" in line:
            process.send_signal(signal.SIGTERM)
            break
    stderr.append(process.communicate(timeout=240)[1])
    stderr = "".join(stderr)
    assert process.returncode == 0, stderr
    assert "stopped by signal 15 in epoch 1 after step 1 of 32" in stderr
    assert "checkpoint saved in" in stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr and "epoch 1, step 1 of 32" in result.stderr
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    _assert_same_run(tmp_path, smoke_run["workdir"])


def _assert_same_run(workdir, reference):
    ours, theirs = inference.load(workdir), inference.load(reference)
    assert ours.step == theirs.step == 4 * 32
    assert_trees_equal(ours.variables["params"], theirs.variables["params"])
    assert_trees_equal(ours.variables["batch_stats"], theirs.variables["batch_stats"])


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_ends_bitwise_equal(tmp_path, smoke_run):
    command = _train_command(tmp_path / "killed")
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115
    process = subprocess.Popen(command, cwd=REPO, stderr=log)
    first_checkpoint = tmp_path / "killed" / "checkpoints" / "32"  # epoch 1 of 32 steps
    deadline = time.time() + 240
    while not first_checkpoint.is_dir() and time.time() < deadline:
        assert process.poll() is None, (tmp_path / "killed.log").read_text()
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.wait(timeout=60)
    assert 1 <= len(read_metrics(tmp_path / "killed")) < 4
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    # The same command never stopped (the same devices and programs).
    _assert_same_run(tmp_path / "killed", smoke_run["workdir"])


def test_fields_added_in_a_later_version_do_not_block_a_resume(tiny_config):
    saved = checkpoint.config_to_json(tiny_config)
    del saved["ema_decay"]  # a checkpoint written before the field existed
    assert configuration.resume_differences(saved, tiny_config) == []
    saved["batch_size"] = 7
    assert configuration.resume_differences(saved, tiny_config) == ["batch_size: 7 -> 32"]


def _rewrite_json_items(step_dir, rewrite_meta, rewrite_config):
    """Rewrites a step's meta and config items in place (orbax stores each as JSON)."""
    import json

    for name, rewrite in (("meta", rewrite_meta), ("config", rewrite_config)):
        path = step_dir / name / "metadata"
        path.write_text(json.dumps(rewrite(json.loads(path.read_text()))))


@pytest.mark.slow
def test_checkpoints_of_the_previous_schema_still_load_and_resume(tiny_config, tmp_path):
    """Meta schema 1 (no version, the dataset under 'dataset_info') and a config with
    the names of that time ('seed', 'tf_seed'): predict from it, and resume it."""
    import vgg_jax

    tiny_config.num_epochs = 1
    tiny_config.conv_dropout = "paddle"
    tiny_config.schedule = "constant"  # so that the resume below may add an epoch
    train.train_and_evaluate(tiny_config, str(tmp_path))
    expected = vgg_jax.load(tmp_path).predict(np.full((2, 16, 16, 3), 100, np.uint8))

    def old_meta(meta):
        assert meta.pop("schema") == checkpoint.META_SCHEMA
        # Digests of the arrays only, as then (none of the JSON items, the meta's own).
        digests = {name: meta["digests"][name] for name in ("model", "train")}
        return {**meta, "dataset_info": meta.pop("dataset"), "digests": digests}

    def old_config(config):
        del config["eval_flip_tta"]  # a field added since
        return {**config, "conv_dropout": "seed"}

    for step_dir in (tmp_path / "checkpoints").iterdir():
        _rewrite_json_items(step_dir, old_meta, old_config)
    model = vgg_jax.load(tmp_path)
    assert model.config.conv_dropout == "paddle" and not model.config.eval_flip_tta
    np.testing.assert_array_equal(model.predict(np.full((2, 16, 16, 3), 100, np.uint8)), expected)

    tiny_config.num_epochs = 2
    state = train.train_and_evaluate(tiny_config, str(tmp_path))
    assert int(state.step) == 16
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]


def test_on_several_cpu_devices_replicated_arrays_are_saved_whole(tmp_path, tiny_config):
    # Replica-parallel saving slices every replicated array once per device and save:
    # pure overhead where the devices share the host's memory.
    import orbax.checkpoint as ocp

    from vgg_jax import models

    assert jax.device_count() == 8 and jax.default_backend() == "cpu"
    handler = models.backend_tuning(tiny_config).array_handler
    checkpoint.create_manager(str(tmp_path), array_handler=handler).close()
    assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False
