"""Two processes on this machine (jax.distributed on localhost, gloo CPU collectives, two
fake devices each) train as one run of four devices: the same losses and parameters,
each process reading only its share, one checkpoint, and a signal to one stopping both.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import REPO, smoke_training_command, write_image_folder

import vgg_jax
from vgg_jax import models, optim, train
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
    return write_image_folder(root, ("a", "b"), (24, 7), (20, 20), suffix=".png")


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


def _assert_same_training(ours, theirs) -> None:
    """The two runs' weights agree to 1% of how far training moved each tensor from its
    initialisation (plus rounding). Not elementwise to float32 rounding: over 12 steps, a
    2x2 max-pool window whose two largest inputs are within reassociation of each other
    can route a gradient to the other pixel in one run (tests/test_train.py finds such windows), and
    the channels behind it drift apart by a fraction of an update. A process that trained
    on the wrong share, or did not sum its gradients with the other's, is off by the
    size of the updates themselves."""
    config = theirs.config
    model = models.build_model(config, theirs.info)
    schedule = optim.create_learning_rate_schedule(config, 6)
    start = train.create_train_state(config, model, config.image_size, schedule)
    initial = {"params": start.params, "batch_stats": start.batch_stats}

    def check(path, a, b, init):
        moved = np.linalg.norm(np.asarray(b, np.float64) - np.asarray(init, np.float64))
        apart = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        # Plus float32 rounding of values ~1 (1e-5 each): a bias before BN has a zero
        # gradient, so rounding is all that moves it.
        assert apart <= 0.01 * moved + 1e-5 * np.sqrt(np.size(b)), (
            jax.tree_util.keystr(path),
            apart,
            moved,
        )

    jax.tree_util.tree_map_with_path(
        check, ours.variables, theirs.variables, jax.device_get(initial)
    )


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
        # The cross-entropy of a confident prediction is the difference of two logit-sized
        # numbers (logsumexp minus the label's logit): exact to about one float32 ulp of
        # the logits (9.5e-7 for |logits| in [8, 16), where a loss of 1e-4 puts them), not
        # to a relative 1e-4 of a loss near 0 (seen: 1e-4 apart by 1.2e-3 relative).
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=2e-6)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
    # One checkpoint per step, which a single process restores.
    steps = sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir())
    assert steps == ["12", "6"]
    ours, theirs = vgg_jax.load(tmp_path / "multi"), vgg_jax.load(tmp_path / "single")
    _assert_same_training(ours, theirs)
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
            # worker reads ahead past the last step (a few batches of 4: at most 8),
            # plus each process's check that every class has a readable image (the
            # first image of each of the 2 classes, when the data is sound).
            reads_per_file = [(shares[0] + shares[1]).count(path) for path in every]
            assert min(reads_per_file) >= 3
            assert sum(reads_per_file) <= 3 * len(every) + 2 * 8 * 4 + 2 * 2


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


# ----------------------------------------------------------------- peers that die or never come

TIMESTAMPED = re.compile(r"^\d\d:\d\d:\d\d ")
HEARTBEAT_SECONDS = 5


def _other_lines(err: str) -> list[str]:
    """stderr lines that are not log lines (a log line starts with its time)."""
    return [line for line in err.splitlines() if line.strip() and not TIMESTAMPED.match(line)]


def _assert_one_line(err: str, pattern: str) -> None:
    others = _other_lines(err)
    assert len(others) == 1, err[-3000:]
    assert re.search(pattern, others[0]), others[0]
    assert "Fatal Python error" not in err and "Traceback" not in err


def _stop_after_kill(processes, victim: int, workdir) -> tuple[float, tuple]:
    """SIGKILLs process `victim` once an epoch is logged; returns how long the other
    took to stop after it and its (status, stdout, stderr)."""
    log = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while not log.exists():
        assert processes[1 - victim].poll() is None, processes[1 - victim].communicate()
        assert time.time() < deadline, "no epoch finished"
        time.sleep(0.2)
    processes[victim].kill()
    killed = time.monotonic()
    out, err = processes[1 - victim].communicate(timeout=300)
    seconds = time.monotonic() - killed
    processes[victim].communicate()
    return seconds, (processes[1 - victim].returncode, out, err)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_other_with_one_line(tmp_path, victim):
    """Process 1 killed: process 0 notices the closed connection of a collective, or
    misses its heartbeats within HEARTBEAT_SECONDS (and JAX's detection delay). Process 0
    (the coordinator) killed: process 1 loses the coordinator at once. Either way one
    line, and a rerun resumes from the last checkpoint."""
    data = _folder(tmp_path / "data")
    # One unreadable image in each process's share of the training split (the first
    # half of the sorted files is process 0's, the second process 1's).
    for name in ("a", "b"):
        (data / "train" / name / "bad.png").write_bytes(b"not a png")
    extra = [
        "--config.num_epochs=50",
        f"--config.distributed_heartbeat_timeout_seconds={HEARTBEAT_SECONDS}",
    ]
    processes = _two_processes(tmp_path, tmp_path / "w", data, extra)
    seconds, (code, _, err) = _stop_after_kill(processes, victim, tmp_path / "w")
    print(f"process {1 - victim} stopped {seconds:.1f} s after SIGKILL of process {victim}")
    assert code != 0
    if victim == 1:
        _assert_one_line(err, r"^error: (process 1 of the run sent no heartbeat|a collective)")
        assert seconds < 60  # HEARTBEAT_SECONDS, a detection delay of the same order, load
        assert re.search(r"^\d\d:\d\d:\d\d skipping .*unreadable", err, re.M)
        return
    _assert_one_line(err, r"^\[process 1\] error: (lost the coordinator|a collective)")
    assert seconds < 30
    # Process 1 printed only its warnings, prefixed, and no epoch line.
    lines = [line for line in err.splitlines() if TIMESTAMPED.match(line)]
    assert lines and all(line[9:].startswith("[process 1] ") for line in lines), err[-3000:]
    assert any("skipping" in line and "unreadable" in line for line in lines)
    assert not any(" epoch " in line for line in lines)

    done = int(read_metrics(tmp_path / "w")[-1]["epoch"])
    results = _wait(
        _two_processes(tmp_path, tmp_path / "w", data, [f"--config.num_epochs={done + 1}"])
    )
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert [r["epoch"] for r in read_metrics(tmp_path / "w")] == list(range(1, done + 2))


def test_a_process_whose_peer_never_comes_stops_with_one_line(tmp_path):
    """Alone, process 0 stops after distributed_init_timeout_seconds with one line; a
    SIGTERM during the wait stops it at once, with status 0."""
    data = _folder(tmp_path / "data")
    flags = [
        "--config.distributed=True",
        f"--config.coordinator_address=localhost:{_free_port()}",
        "--config.num_processes=2",
        "--config.process_id=0",
        "--config.distributed_init_timeout_seconds=5",
    ]
    started = time.monotonic()
    alone = subprocess.run(
        _command(tmp_path / "w", data, flags),
        cwd=REPO,
        env=_env(tmp_path, 2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    print(f"process 0 alone stopped {seconds:.1f} s after it started (init timeout 5 s)")
    assert alone.returncode != 0
    _assert_one_line(alone.stderr, r"^error: the processes of the run did not all connect")
    assert seconds < 120

    flags[-1] = "--config.distributed_init_timeout_seconds=300"
    waiting = subprocess.Popen(
        _command(tmp_path / "w", data, flags),
        cwd=REPO,
        env=_env(tmp_path, 2),
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(8)  # in the wait by now (imports take about 3 s)
    waiting.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, err = waiting.communicate(timeout=60)
    assert time.monotonic() - signalled < 10
    assert waiting.returncode == 0, err
    _assert_one_line(err, r"^stopped by signal 15 while waiting for the other processes")
