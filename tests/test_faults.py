"""Single-process faults found by issue 24's adversarial pass: the best checkpoint
after a resume, checkpoint items outside the digests, the lock file unlinked, bad
weight files and config values, an undecodable metrics log."""

import json
import logging
import shutil
import types

import numpy as np
import pytest
from conftest import make_tiny_config

from vgg_jax import checkpoint, train
from vgg_jax.preemption import Preempted

# ----------------------------------------------------------- the best checkpoint (1)


def _state(step: int):
    return types.SimpleNamespace(
        step=step,
        params={"w": np.full(3, step, np.float32)},
        batch_stats={"m": np.zeros(2, np.float32)},
        opt_state={"s": np.ones(2, np.float32)},
        rng=np.zeros(2, np.uint32),
        ema={},
    )


def _save_epochs(directory, config, first_step: int, accuracies: list[float]) -> None:
    """What one run (a first one, or a resumed one) saves: a step per epoch, each with
    its test accuracy, by a manager keeping the latest step and the best."""
    manager = checkpoint.create_manager(str(directory), keep=1, async_save=False)
    for step, accuracy in enumerate(accuracies, first_step):
        checkpoint.save(manager, _state(step), config, {"test_accuracy": accuracy}, accuracy)
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
    checkpoint.check_data_item(manager, mid_epoch)  # intact as written
    (position,) = (steps / str(mid_epoch) / "data").glob("*.json")
    state = json.loads(position.read_text())
    state["next_index"] += 1
    position.write_text(json.dumps(state, indent=4))
    with pytest.raises(checkpoint.DamagedCheckpointError, match="'data' item fails"):
        checkpoint.check_data_item(manager, mid_epoch)
    manager.close()

    with caplog.at_level(logging.INFO, logger="vgg_jax"):
        state = train.train_and_evaluate(stream_config, str(tmp_path / "run"))
    assert (steps / f"{mid_epoch}.damaged").is_dir()
    assert any("'data' item fails its checksum" in r.getMessage() for r in caplog.records)
    assert int(state.step) == 2 * mid_epoch - 2  # resumed from the epoch's start


def test_every_json_item_is_covered_by_a_digest():
    config = make_tiny_config()
    _ = config  # the digests are of JSON values, whatever their source
    from vgg_jax import checksums

    meta = {"dataset": {"mean": [125.3, 123.0]}, "epoch": 1, "digests": {"model": "x"}}
    meta["digests"]["meta"] = checksums.meta_digest(meta)
    assert checksums.meta_digest(json.loads(json.dumps(meta, indent=2))) == meta["digests"]["meta"]
    changed = json.loads(json.dumps(meta))
    changed["dataset"]["mean"][0] = 125.4
    assert checksums.meta_digest(changed) != meta["digests"]["meta"]
    assert checksums.iterator_state_digest(b'{"next_index": 90}') == checksums.json_digest(
        {"next_index": 90}
    )
    assert checksums.iterator_state_digest('{"next_index": 91}') != checksums.json_digest(
        {"next_index": 90}
    )
