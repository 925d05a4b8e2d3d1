"""Two processes on this machine (jax.distributed on localhost, gloo CPU collectives, two
fake devices each) train as one run of four devices: the same losses and parameters,
each process reading only its share, one checkpoint, and a signal to one stopping both.
"""

import json
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import REPO, smoke_training_command
from PIL import Image

import vgg_jax
from vgg_jax.metrics_log import read_metrics

pytestmark = pytest.mark.slow

# Every image file read (in binary mode, as data/views.py reads them), appended per
# process to $VGG_TEST_READS.<pid>; imported by every Python process started with it on
# PYTHONPATH (grain's workers too).
READ_LOGGER = """
import builtins
import os
if os.environ.get("VGG_TEST_READS"):
    _open = builtins.open
    def _logged_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and "b" in mode and "r" in mode:
            if os.fspath(file).endswith(".png"):
                with _open(f"{os.environ['VGG_TEST_READS']}.{os.getpid()}", "a") as log:
                    log.write(f"{os.fspath(file)}\\n")
        return _open(file, mode, *args, **kwargs)
    builtins.open = _logged_open
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _folder(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 7)):
        for label, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 70, (20, 20, 3), dtype=np.uint8)
                pixels[..., label] += 180
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _env(tmp_path, devices, reads=None):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(READ_LOGGER)
    env = {
        **os.environ,
        "JAX_NUM_CPU_DEVICES": str(devices),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [str(hooks), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    if reads:
        env["VGG_TEST_READS"] = str(reads)
    return env


def _command(workdir, data, extra=()):
    return smoke_training_command(
        workdir,
        "--config.dataset=image_folder",
        f"--config.data_dir={data}",
        "--config.image_size=16",
        "--config.batch_size=8",
        "--config.num_epochs=2",
        "--config.conv_dropout=none",
        "--config.head_dropout=0.0",  # masks follow batch positions, which differ
        "--config.progress_bar=False",
        *extra,
    )


def _two_processes(tmp_path, workdir, data, extra=(), reads_prefix=None):
    port = _free_port()
    processes = []
    for process_id in range(2):
        reads = f"{reads_prefix}{process_id}" if reads_prefix else None
        flags = [
            "--config.distributed=True",
            f"--config.coordinator_address=localhost:{port}",
            "--config.num_processes=2",
            f"--config.process_id={process_id}",
        ]
        processes.append(
            subprocess.Popen(
                _command(workdir, data, [*flags, *extra]),
                cwd=REPO,
                env=_env(tmp_path, 2, reads),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def _wait(processes, timeout=600):
    results = [p.communicate(timeout=timeout) for p in processes]
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, results, strict=True)]


def _reads(prefix):
    """Every file each process (with its workers) opened, with repeats."""
    found = {}
    for process_id in range(2):
        paths = []
        folder, stem = os.path.split(f"{prefix}{process_id}")
        for name in os.listdir(folder):
            if name.startswith(stem + "."):
                with open(os.path.join(folder, name)) as log:
                    paths += [line.strip() for line in log if line.strip()]
        found[process_id] = paths
    return found


@pytest.mark.parametrize("input_kind", ["device", "stream"])
def test_two_processes_train_like_one_process_of_four_devices(tmp_path, input_kind):
    data = _folder(tmp_path / "data")
    extra = [f"--config.input={input_kind}", "--config.input_workers=1"]
    # The reference decodes in threads: the same batches as worker processes
    # (tests/test_streaming.py), without starting any.
    threads = [f"--config.input={input_kind}", "--config.input_workers=0"]
    single = subprocess.run(
        _command(tmp_path / "single", data, threads),
        cwd=REPO,
        env=_env(tmp_path, 4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr
    results = _wait(_two_processes(tmp_path, tmp_path / "multi", data, extra, tmp_path / "reads"))
    for code, _, err in results:
        assert code == 0, err[-3000:]

    single_log, multi_log = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
    assert [r["epoch"] for r in multi_log] == [1, 2]  # one log, written by process 0
    for a, b in zip(single_log, multi_log, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
    # One checkpoint per step, which a single process restores.
    steps = sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir())
    assert steps == ["12", "6"]
    ours, theirs = vgg_jax.load(tmp_path / "multi"), vgg_jax.load(tmp_path / "single")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        ours.variables,
        theirs.variables,
    )
    # Each process read only its share of each split, and together they read it all.
    reads = _reads(tmp_path / "reads")
    for split in ("train", "test"):
        every = sorted(str(p) for p in (data / split).rglob("*.png"))
        shares = [sorted(p for p in reads[i] if f"/{split}/" in p) for i in range(2)]
        if input_kind == "device" or split == "test":
            # A fixed share each: disjoint, read once per load (device) or evaluation.
            assert not set(shares[0]) & set(shares[1])
            assert sorted(set(shares[0]) | set(shares[1])) == every
        else:
            # Streamed training: each epoch's shuffled stream is shared out anew, so a
            # process reads different files each epoch; each file is read once for the
            # statistics sample and once per epoch in all, plus what each process's
            # worker reads ahead past the last step (a few batches of 4: at most 8).
            reads_per_file = [(shares[0] + shares[1]).count(path) for path in every]
            assert min(reads_per_file) >= 3
            assert sum(reads_per_file) <= 3 * len(every) + 2 * 8 * 4


def test_a_signal_to_one_process_stops_both_with_a_checkpoint(tmp_path):
    data = _folder(tmp_path / "data")
    processes = _two_processes(
        tmp_path, tmp_path / "w", data, ["--config.num_epochs=50", "--config.log_every_steps=1"]
    )
    log = tmp_path / "w" / "metrics.jsonl"
    deadline = time.time() + 300
    while not log.exists() and time.time() < deadline:  # training is under way
        time.sleep(0.5)
    processes[1].send_signal(signal.SIGTERM)
    results = _wait(processes)
    for code, _, err in results:
        assert code == 0, err[-3000:]
        assert "checkpoint saved" in err
    model = vgg_jax.load(tmp_path / "w")
    assert 6 <= model.step < 50 * 6
    meta = json.loads(
        (tmp_path / "w" / "checkpoints" / str(model.step) / "meta" / "metadata").read_text()
    )
    assert meta["epoch"] * 6 + meta["step_in_epoch"] == model.step
