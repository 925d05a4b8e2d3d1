"""Single-process faults found by issue 24's adversarial pass: the best checkpoint
after a resume, checkpoint items outside the digests, the lock file unlinked, bad
weight files and config values, an undecodable metrics log."""

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
from conftest import CONFIGS, make_tiny_config, random_variables, run_cli

import vgg_jax
from vgg_jax import (
    checkpoint,
    checksums,
    config_checks,
    configuration,
    export,
    models,
    pretrained,
    train,
)
from vgg_jax.configuration import load_config_file
from vgg_jax.data import DatasetInfo
from vgg_jax.metrics_log import MetricsLog, read_metrics
from vgg_jax.preemption import Preempted
from vgg_jax.workdir_lock import WorkdirBusyError, WorkdirLock

# ----------------------------------------------------------- the best checkpoint (1)


def _state(step: int) -> train.TrainState:
    return train.TrainState(
        step=step,
        apply_fn=None,
        tx=None,
        params={"w": np.full(3, step, np.float32)},
        batch_stats={"m": np.zeros(2, np.float32)},
        opt_state={"s": np.ones(2, np.float32)},
        rng=np.zeros(2, np.uint32),
    )


def _save_epochs(directory, config, first_step: int, accuracies: list[float]) -> None:
    """What one run (a first one, or a resumed one) saves: a step per epoch, each with
    its test accuracy, by a manager keeping the latest step and the best."""
    manager = checkpoint.create_manager(str(directory), keep=1, async_save=False)
    for step, accuracy in enumerate(accuracies, first_step):
        checkpoint.save(manager, _state(step), config, {"test_accuracy": accuracy})
    manager.close()


@pytest.mark.parametrize("written_by", ["this version", "a version that stored no metrics"])
def test_the_best_step_survives_a_resume(tiny_config, tmp_path, written_by):
    _save_epochs(tmp_path, tiny_config, 1, [0.5, 0.9, 0.6])
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]
    if written_by != "this version":  # before the fix, orbax wrote no metrics item
        for metrics in tmp_path.glob("*/metrics"):
            shutil.rmtree(metrics)
    _save_epochs(tmp_path, tiny_config, 4, [0.7])  # the rerun, with a new manager
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 4]
    assert checkpoint.locate(str(tmp_path), "best").step == 2


# ------------------------------------------------- every item a restore reads (2)


@pytest.fixture
def stream_config(tiny_config, tmp_path):
    from test_streaming import _folder

    tiny_config.dataset = "image_folder"
    tiny_config.data_dir = str(_folder(tmp_path / "data"))
    tiny_config.input = "stream"
    tiny_config.augment = "random_resized_crop"
    tiny_config.batch_size = 8
    tiny_config.input_workers = 0
    tiny_config.num_epochs = 2
    return tiny_config


@pytest.mark.slow
def test_a_changed_stream_position_is_damage(stream_config, tmp_path, monkeypatch, caplog):
    from test_checkpoint import SignalAfter

    monkeypatch.setattr(train, "PreemptionGuard", lambda: SignalAfter(5))  # mid epoch 2
    with pytest.raises(Preempted):
        train.train_and_evaluate(stream_config, str(tmp_path / "run"))
    monkeypatch.undo()
    steps = tmp_path / "run" / "checkpoints"
    mid_epoch = max(int(p.name) for p in steps.iterdir() if p.name.isdigit())
    manager = checkpoint.create_manager(str(steps), read_only=True)
    meta = checkpoint.read_meta(manager, mid_epoch)
    checkpoint.check_data_item(manager, mid_epoch, meta)  # intact as written
    (position,) = (steps / str(mid_epoch) / "data").glob("*.json")
    state = json.loads(position.read_text())
    state["next_index"] += 1
    position.write_text(json.dumps(state, indent=4))
    with pytest.raises(checkpoint.DamagedCheckpointError, match="'data' item fails"):
        checkpoint.check_data_item(manager, mid_epoch, meta)
    manager.close()

    with caplog.at_level(logging.INFO, logger="vgg_jax"):
        state = train.train_and_evaluate(stream_config, str(tmp_path / "run"))
    assert (steps / f"{mid_epoch}.damaged").is_dir()
    assert any("'data' item fails its checksum" in r.getMessage() for r in caplog.records)
    assert int(state.step) == 2 * mid_epoch - 2  # resumed from the epoch's start


def test_the_json_digests_follow_the_values_not_the_layout():
    meta = {"dataset": {"mean": [125.3, 123.0]}, "epoch": 1, "digests": {"model": "x"}}
    meta["digests"]["meta"] = checksums.meta_digest(meta)
    assert checksums.meta_digest(json.loads(json.dumps(meta, indent=2))) == meta["digests"]["meta"]
    changed = json.loads(json.dumps(meta))
    changed["dataset"]["mean"][0] = 125.4
    assert checksums.meta_digest(changed) != meta["digests"]["meta"]
    state = {"next_index": 90}
    assert checksums.iterator_state_digest(json.dumps(state, indent=4).encode()) == (
        checksums.iterator_state_digest(state)
    )
    assert checksums.iterator_state_digest('{"next_index": 91}') != (
        checksums.iterator_state_digest(state)
    )


# ------------------------------------------------------- an exported model's input (3)


def _checkpoint_of_random_weights(workdir, image_size=16, head="torchvision"):
    """A checkpoint as training at `image_size` would leave it (random weights)."""
    from test_finetune import _write_checkpoint

    config = load_config_file(CONFIGS / "smoke.py")
    config.update(head=head, image_size=image_size)
    info = DatasetInfo(("a", "b", "c"), (110.0, 120.0, 100.0), (60.0,) * 3, 16, 1, 1)
    variables = random_variables(models.build_model(config, info), image_size)
    _write_checkpoint(workdir, config, variables, info)
    return workdir


@pytest.mark.slow
def test_an_exported_model_predicts_as_its_checkpoint_does(tmp_path):
    run = _checkpoint_of_random_weights(tmp_path / "run")
    out = tmp_path / "out.safetensors"
    export.export_checkpoint(str(run), str(out), "safetensors")
    assert json.loads((tmp_path / "out.safetensors.json").read_text())["image_size"] == 16
    exported, trained = pretrained.predictor(out), vgg_jax.load(run)
    assert exported.image_size == trained.image_size == 16
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 30), (9, 50))]
    # The same weights, inputs and arithmetic: float32 rounding of one program or another.
    np.testing.assert_allclose(exported.predict(pictures), trained.predict(pictures), atol=1e-5)


# ------------------------------------------------------------------ the lock file (4)


def test_removing_the_lock_file_does_not_free_the_workdir(tmp_path):
    holder = WorkdirLock(str(tmp_path)).acquire()
    (tmp_path / ".lock").unlink()
    with pytest.raises(WorkdirBusyError, match="in use by another trainer"):
        WorkdirLock(str(tmp_path)).acquire()
    holder.check()  # the holder writes the file naming it again
    with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
        WorkdirLock(str(tmp_path)).acquire()
    holder.release()
    WorkdirLock(str(tmp_path)).acquire().release()


# --------------------------------------------------------- one line, not a traceback (5)


def test_a_truncated_weight_file_is_a_format_error(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({"features.0.weight": np.zeros((4, 3, 3, 3), np.float32)}, path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(pretrained.WeightFormatError, match="w.safetensors: not a readable"):
        pretrained.load(path)
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.pth"
    torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(pretrained.WeightFormatError, match="w.pth: not a readable"):
        pretrained.load(path)


def _keras_file(path, layers):
    """A weight file in the published Keras files' layout: name -> [kernel, bias]."""
    import h5py

    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = [name.encode() for name in layers]
        for name, values in layers.items():
            group = file.create_group(name)
            names = [f"{name}/{part}:0".encode() for part in ("kernel", "bias")]
            group.attrs["weight_names"] = names
            for weight_name, value in zip(names, values, strict=True):
                group.create_dataset(weight_name.decode(), data=value)
    return path


def test_keras_weights_of_the_wrong_shapes_are_refused_when_read(tmp_path):
    def conv(cin, cout):
        return [np.zeros((3, 3, cin, cout), np.float32), np.zeros(cout, np.float32)]

    layers = {"block1_conv1": conv(3, 4), "block1_conv2": conv(5, 4), "block2_conv1": conv(4, 8)}
    with pytest.raises(pretrained.WeightFormatError, match=r"conv1_2 has a kernel of shape"):
        pretrained.load(_keras_file(tmp_path / "bad.h5", layers))
    layers["block1_conv2"] = conv(4, 4)
    layers |= {
        "fc1": [np.zeros((8 * 4, 6), np.float32), np.zeros(6, np.float32)],
        "fc2": [np.zeros((6, 6), np.float32), np.zeros(5, np.float32)],  # bias too short
        "predictions": [np.zeros((6, 3), np.float32), np.zeros(3, np.float32)],
    }
    with pytest.raises(pretrained.WeightFormatError, match=r"fc2 has a kernel of shape"):
        pretrained.load(_keras_file(tmp_path / "bad_head.h5", layers))
    layers["fc2"][1] = np.zeros(6, np.float32)
    model, _ = pretrained.load(_keras_file(tmp_path / "good.h5", layers))
    assert model.num_classes == 3


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("seed", 99999999999999999999, "seed: 99999999999999999999 is not an integer in"),
        ("width", 1e9, "width: 1e+09 gives convolutions of up to"),
        ("freeze", "features", "freeze: 'features' keeps pretrained layers: it needs init_from"),
        ("backbone_lr_factor", 0.1, "backbone_lr_factor: 0.1 slows pretrained layers"),
    ],
)
def test_config_values_that_cannot_work_are_refused_at_the_door(field, value, message):
    config = make_tiny_config()
    config[field] = value
    with pytest.raises(configuration.ConfigError, match=re.escape(message)):
        config_checks.validate(config)


@pytest.fixture(scope="module")
def written_checkpoint(tmp_path_factory):
    return _checkpoint_of_random_weights(tmp_path_factory.mktemp("written") / "run")


def _one_error_line(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("export to a missing folder", "no folder"),
        ("export of a damaged step", "is damaged"),
        ("evaluate without meta/metadata", "its meta item is unreadable"),
        ("predict with a truncated .safetensors", "not a readable safetensors file"),
        ("train with seed=99999999999999999999", "is not an integer in [0, 2**32 - 1]"),
        ("train with width=1e9", "width: 1e+09 gives convolutions"),
    ],
)
def test_bad_inputs_end_in_one_error_line(written_checkpoint, tmp_path, case, message):
    run = shutil.copytree(written_checkpoint, tmp_path / "run")
    step = next(p for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    smoke = f"--config={CONFIGS / 'smoke.py'}"
    if case.startswith("export to"):
        args = ["vgg_jax.export", f"--workdir={run}", str(tmp_path / "nowhere" / "out.pth")]
    elif case.startswith("export of"):
        shutil.rmtree(step / "model" / "d")
        args = ["vgg_jax.export", f"--workdir={run}", str(tmp_path / "out.safetensors")]
    elif case.startswith("evaluate"):
        (step / "meta" / "metadata").unlink()
        args = ["vgg_jax.evaluate", f"--workdir={run}"]
    elif case.startswith("predict"):
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
        args = ["vgg_jax.predict", f"--weights={weights}", str(tmp_path / "x.png")]
    else:
        override = case.removeprefix("train with ")
        args = ["vgg_jax.main", smoke, f"--workdir={tmp_path / 'w'}", f"--config.{override}"]
    assert message in _one_error_line(run_cli(*args))


@pytest.mark.slow
def test_export_prints_only_its_result(written_checkpoint, tmp_path):
    out = tmp_path / "out.safetensors"
    result = run_cli(
        "vgg_jax.export", f"--workdir={written_checkpoint}", "--format=safetensors", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip() == ""
    assert result.stdout.startswith(f"wrote {out} (torchvision layout)")


# ---------------------------------------------------------------- the metrics log (5, 6)


def test_bad_lines_of_the_metrics_log_are_dropped_naming_the_file(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(
        b'{"epoch": 1, "test_accuracy": 0.5}\n'
        b'{"epoch": "two", "test_accuracy": 0.6}\n'
        b'{"epoch": 2, "test_accuracy": 0.\xff7}\n'
        b'{"epoch": 2, "test_accuracy": 0.7}\n'
    )
    with caplog.at_level(logging.WARNING, logger="vgg_jax"):
        assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
        log = MetricsLog(str(tmp_path))
        log.truncate_after(1)
        log.close()
    dropped = [r.getMessage() for r in caplog.records if "not a whole record" in r.getMessage()]
    assert len(dropped) == 4 and all(str(path) in message for message in dropped)
    assert dropped[0].startswith(f"{path} line 2") and dropped[1].startswith(f"{path} line 3")
    assert path.read_text() == '{"epoch": 1, "test_accuracy": 0.5}\n'
