"""The stream's worker processes: a dead worker ends the run in one line (and the rerun
resumes), no process of ours outlives its trainer, nothing is left in /dev/shm."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, in_private_mount, smoke_training_command, write_image_folder

from vgg_jax.data import workers

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None, reason="needs unshare (util-linux) for a private /dev/shm"
)


def _command(tmp_path):
    root = tmp_path / "data"
    if not root.exists():
        write_image_folder(root, per_class=(96, 16), size=(40, 48))
    return smoke_training_command(
        tmp_path / "run",
        "--config.dataset=image_folder",
        f"--config.data_dir={root}",
        "--config.input=stream",
        "--config.input_workers=2",
        "--config.augment=random_resized_crop",
        "--config.batch_size=8",
        "--config.num_epochs=3",
        "--config.progress_bar=False",
    )


def _run_with_fault(tmp_path, fault: str) -> dict:
    """The training command under tests/stream_faults.py, in a private mount namespace
    whose /dev/shm is a fresh tmpfs: what is left there is this run's."""
    driver = [sys.executable, str(REPO / "tests" / "stream_faults.py"), fault, "--"]
    result = subprocess.run(
        in_private_mount("mount -t tmpfs tmpfs /dev/shm", [*driver, *_command(tmp_path)]),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_in_one_line_and_the_rerun_resumes(tmp_path):
    report = _run_with_fault(tmp_path, "kill_worker")
    assert report["workers_seen"] >= 2
    assert report["returncode"] == 1, report
    last = report["stderr_tail"][-1]
    assert last.startswith("error: input worker process") and "SIGKILL" in last, report
    assert report["seconds_to_stop"] < 30, report
    assert report["survivors"] == [] and report["shm"] == [], report
    rerun = _run_with_fault(tmp_path, "none")
    assert rerun["returncode"] == 0, rerun
    assert rerun["survivors"] == [] and rerun["shm"] == [], rerun


@pytest.mark.slow
def test_nothing_of_a_killed_trainer_survives_it(tmp_path):
    report = _run_with_fault(tmp_path, "kill_trainer")
    assert report["workers_seen"] >= 2
    assert report["returncode"] == -9
    assert report["survivors"] == [] and report["shm"] == [], report


def test_exit_descriptions_name_the_signal():
    assert workers.describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert workers.describe_exit(3) == "exit code 3"


def _sleep_forever() -> None:
    import time

    time.sleep(600)


def test_a_worker_killed_while_its_stream_closes_is_not_reported():
    # grain's close kills a worker that does not stop within its timeout (one blocked on
    # a full pipe) and returns at once: the exit is asked for, however late it lands.
    import multiprocessing
    import time

    supervisor = workers.Supervisor()
    worker = multiprocessing.get_context("spawn").Process(
        target=_sleep_forever, name=f"{workers.GRAIN_WORKER_PREFIX}-test", daemon=True
    )
    worker.start()
    supervisor.start()
    deadline = time.monotonic() + 30
    while worker.pid not in supervisor.known and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.pid in supervisor.known
    with supervisor.stopping():
        worker.kill()  # as grain does, without waiting for the death
    time.sleep(3 * workers.POLL_SECONDS)
    assert supervisor.error is None
    assert worker.exitcode == -9
