"""The Slurm launch of docs/multihost.md, under a real one-node Slurm cluster started for this
module (munged, slurmctld and slurmd from Debian's `slurm-wlm` and `munge`, in a temporary
folder, as root): `srun -n2 ... --config.distributed=True` with JAX's own Slurm
detection trains like one process of two devices, stops on `scancel` with one
checkpoint, resumes bitwise, and ends with one line when a task is killed.
"""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import REPO, smoke_training_command

import vgg_jax
from vgg_jax.metrics_log import read_metrics

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd", "srun")
# Short runs: 4 epochs of 8 steps; the stop and the kill come after epoch 1. No dropout:
# its masks follow batch positions, and the processes' shares reorder a global batch.
RUN = (
    "--config.num_epochs=4",
    "--config.max_steps_per_epoch=8",
    "--config.head_dropout=0.0",
    "--config.progress_bar=False",
)


def _missing() -> str | None:
    absent = [name for name in DAEMONS if shutil.which(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd needs root to start job steps"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=vggjaxtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
FirstJobId={first_job}
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster whose node is this host; yields the environment for srun."""
    reason = _missing()
    if reason and os.environ.get("VGG_JAX_REQUIRE_SLURM") == "1":  # CI installs Slurm
        pytest.fail(f"VGG_JAX_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    # JAX's Slurm detection takes the coordinator's port from the job id: a random first
    # id keeps two such clusters (two test workers) off each other's ports.
    conf = SLURM_CONF.format(
        host=socket.gethostname().split(".")[0],
        root=root,
        ctld_port=_free_port(),
        slurmd_port=_free_port(),
        first_job=random.randint(1, 10**6),
        cpus=os.cpu_count(),
    )
    (root / "slurm.conf").write_text(conf)
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    munge = [f"--key-file={key}", f"--socket={root}/munge.socket", f"--seed-file={root}/seed"]
    daemons = [
        subprocess.Popen(
            [
                "munged",
                "-F",
                "--force",
                *munge,
                f"--pid-file={root}/munged.pid",
                f"--log-file={root}/munged.log",
            ]  # fmt: skip
        ),
        subprocess.Popen(["slurmctld", "-D", "-f", env["SLURM_CONF"]], env=env),
        subprocess.Popen(["slurmd", "-D", "-f", env["SLURM_CONF"]], env=env),
    ]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True)
            if state.stdout.strip() == b"idle":
                break
            time.sleep(0.3)
        else:
            logs = [(root / f"{d}.log").read_text()[-2000:] for d in ("slurmctld", "slurmd")]
            pytest.fail(f"the Slurm node did not come up: {logs}")
        yield env
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
        for daemon in reversed(daemons):
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def _env(slurm, devices):
    return {
        **slurm,
        "JAX_NUM_CPU_DEVICES": str(devices),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def _srun(slurm, workdir, *extra):
    """docs/multihost.md's line on two tasks of one device each."""
    command = smoke_training_command(workdir, "--config.distributed=True", *RUN, *extra)
    return subprocess.Popen(
        ["srun", "-n2", *command],
        cwd=REPO,
        env=_env(slurm, 1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_epoch(workdir, process, timeout=300):
    log = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while not log.exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, "no epoch finished"
        time.sleep(0.2)


def _task_pid(workdir, task: int) -> int:
    """The pid of task `task`'s trainer (its command line names `workdir`)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        ours = b"vgg_jax.main" in command and f"--workdir={workdir}".encode() in command
        if ours and f"SLURM_PROCID={task}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no task {task} of {workdir}")


def _params(workdir):
    return vgg_jax.load(workdir).variables


def test_srun_trains_like_one_process_stops_on_scancel_and_resumes_bitwise(slurm, tmp_path):
    reference = subprocess.Popen(
        smoke_training_command(tmp_path / "one", *RUN),
        cwd=REPO,
        env=_env(slurm, 2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    whole = _srun(slurm, tmp_path / "whole")
    output = whole.communicate(timeout=300)[0]
    assert whole.returncode == 0, output[-3000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    # Only process 0 logs epochs; Slurm's tasks share one output.
    assert len(re.findall(r"epoch \d/4 ", output)) == 4, output[-3000:]
    ones, twos = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "whole")
    assert [r["epoch"] for r in twos] == [1, 2, 3, 4]
    for a, b in zip(ones, twos, strict=True):
        # The two devices' gradients are summed by gloo instead of inside one process: a
        # float32 reassociation of a 2-term sum per weight, far below this tolerance
        # after 32 steps (the same bound as tests/test_multihost.py).
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3, abs=1e-5)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-3, abs=1e-5)

    stopped = _srun(slurm, tmp_path / "stopped")
    _wait_for_epoch(tmp_path / "stopped", stopped)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True)
    subprocess.run(["scancel", *jobs.stdout.split()], env=slurm, check=True)
    output = stopped.communicate(timeout=120)[0]
    assert stopped.returncode == 0, output[-3000:]  # srun: the highest task status
    assert output.count("checkpoint saved") == 2, output[-3000:]  # once per task
    assert "[process 1] stopped by signal 15" in output
    steps = sorted(int(p.name) for p in (tmp_path / "stopped" / "checkpoints").iterdir())
    assert 8 <= steps[-1] < 32

    resumed = _srun(slurm, tmp_path / "stopped")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert [r["epoch"] for r in read_metrics(tmp_path / "stopped")] == [1, 2, 3, 4]
    a, b = _params(tmp_path / "whole"), _params(tmp_path / "stopped")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_killed_task_ends_the_job_with_one_line(slurm, tmp_path):
    job = _srun(slurm, tmp_path / "w", "--config.distributed_heartbeat_timeout_seconds=5")
    _wait_for_epoch(tmp_path / "w", job)
    os.kill(_task_pid(tmp_path / "w", 1), signal.SIGKILL)
    killed = time.monotonic()
    output = job.communicate(timeout=120)[0]
    seconds = time.monotonic() - killed
    assert job.returncode != 0
    errors = [line for line in output.splitlines() if "error:" in line and "srun" not in line]
    ours = [line for line in errors if line.startswith("error: ")]
    assert len(ours) == 1, output[-3000:]  # process 0's one line
    assert re.search(r"process 1 of the run sent no heartbeat|collective operation", ours[0])
    assert "Fatal Python error" not in output and "Check failure" not in output, output[-3000:]
    print(f"survivor stopped {seconds:.1f} s after SIGKILL of task 1")
    assert seconds < 60
