"""The stderr watcher of a distributed process (in vgg_jax.distributed): lines pass as
they come; JAX's fatal abort (C++ log lines, a stack trace, Python's thread dump)
becomes one line saying what happened. The samples are the lines JAX 0.10 printed in
two-process runs on this machine (tests/test_multihost.py makes them for real)."""

import subprocess
import sys

import pytest

from vgg_jax import distributed

SETTINGS = {"coordinator": "localhost:1234", "init_timeout": "300", "heartbeat_timeout": "60"}
STACK_AND_DUMP = b"""*** Check failure stack trace: ***
    @     0x7fd96a440634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
    @     0x7fd96a2b906f  tsl::(anonymous namespace)::PThread::ThreadFn()
Fatal Python error: Aborted

Thread 0x00007fd9725c9b80 (most recent call first):
  File "/x/jax/_src/api.py", line 2512 in block_until_ready

Extension modules: yaml._yaml, jaxlib.cpu_feature_guard, numpy._core._multiarray_umath
"""
FATAL = (
    b"F1206 06:00:52.610669    4746 client.h:80] Terminating process because the JAX "
    b"distributed service detected fatal errors. This most likely indicates that another "
    b"task died; see the other task logs for more details. absl::Status: "
)
LOST_PEER = (
    b"E1206 06:00:52.609740    4729 coordination_service.cc:1549] [1765] Use error polling "
    b"to propagate the following error to all tasks: UNAVAILABLE: The following tasks are "
    b"unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.\n"
    b"E1206 06:00:52.610487    4746 coordination_service_agent.cc:289] Polled an error from "
    b"coordination service (this can be an error from this or another task).\n"
    + FATAL
    + b"UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
    b"The tasks have crashed. Check the task logs for an earlier error.\n\n"
    b"RPC: /xla.coordination.CoordinationService/PollForError\n" + STACK_AND_DUMP
)
LOST_COORDINATOR = (
    FATAL + b"UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task "
    b"was preempted/died/restarted unexpectedly or this task is experiencing network issues.\n"
    b':UNKNOWN:Error received from peer  {grpc_message:"Socket closed", grpc_status:14}\n'
    + STACK_AND_DUMP
)
NEVER_CAME = (
    FATAL + b"DEADLINE_EXCEEDED: Deadline Exceeded\n\n"
    b"RPC: /xla.coordination.CoordinationService/RegisterTask\n" + STACK_AND_DUMP
)


def _watch(process=None):
    written = []
    return distributed.Watch(written.append, process, SETTINGS), written


def _through(data: bytes, process=None, chunk=7) -> str:
    """`data` fed in small pieces (as a pipe may deliver it), then the end."""
    watch, written = _watch(process)
    for start in range(0, len(data), chunk):
        watch.feed(data[start : start + chunk], now=0.0)
    watch.finish()
    return b"".join(written).decode()


@pytest.mark.parametrize(
    ("text", "process", "line"),
    [
        (
            LOST_PEER,
            0,
            "error: process 1 of the run sent no heartbeat for 60 s "
            "(distributed_heartbeat_timeout_seconds): it died or is unreachable",
        ),
        (
            LOST_COORDINATOR,
            1,
            "[process 1] error: lost the coordinator (process 0, localhost:1234)",
        ),
        (
            NEVER_CAME,
            0,
            "error: the processes of the run did not all connect to localhost:1234 within 300 s",
        ),
    ],
)
def test_the_fatal_abort_becomes_one_line(text, process, line):
    before = b"06:00:22 epoch 1/40  train loss 1.2605\n"
    out = _through(before + text, process)
    lines = out.splitlines()
    assert lines[0] == before.decode().strip()
    assert len(lines) == 2 and lines[1].startswith(line), out


def test_the_process_index_learnt_after_start_up_names_the_process():
    control = distributed.CONTROL + b"1\n"
    out = _through(b"\rprogress 10%" + control + LOST_COORDINATOR)
    assert out.split("\n") == [
        "\rprogress 10%[process 1] error: lost the coordinator (process 0, localhost:1234): "
        "it died or is unreachable, so this process stopped; " + distributed.RERUN,
        "",
    ]


def test_other_lines_pass_at_once_and_error_lines_after_a_moment():
    watch, written = _watch()
    watch.feed(b"06:00:01 a log line\n\rbar 50%", now=0.0)
    assert b"".join(written) == b"06:00:01 a log line\n\rbar 50%"  # a partial line too
    error = b"E1206 06:00:52.6 1 gloo.cc:1] a C++ error that is not fatal\n"
    watch.feed(error + b"a line after it\n", now=1.0)
    watch.tick(now=1.0 + distributed.HOLD_SECONDS / 2)
    assert error not in b"".join(written)  # held: a fatal line may follow
    watch.tick(now=1.0 + distributed.HOLD_SECONDS)
    assert b"".join(written).endswith(error + b"a line after it\n")  # in order, unchanged


def test_the_watcher_program_writes_one_line_and_ignores_signals():
    result = subprocess.run(
        [sys.executable, "-m", "vgg_jax.distributed", "--process=0", "--heartbeat-timeout=9"],
        input=b"starting\n" + LOST_PEER,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "starting" and len(lines) == 2
    assert lines[1].startswith("error: process 1 of the run sent no heartbeat for 9 s")
