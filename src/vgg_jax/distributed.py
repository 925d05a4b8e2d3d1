"""Starting a run of several processes (`config.distributed`): bounded waits, and one
line when a peer is lost.

JAX's distributed service ends a process from C++ when the processes of a run do not
all connect within `initialization_timeout`, when a peer stops sending heartbeats for
`heartbeat_timeout_seconds`, and when the coordinator (process 0) is gone: it logs a
fatal error and aborts, and Python's fault handler adds a dump of every thread (60 to
70 lines in all). No documented JAX API replaces that abort (its
`missed_heartbeat_callback` is internal to jaxlib), so this process's stderr passes
through a small watcher process (`vgg_jax.stderr_watch`) that forwards every line as
it comes, and turns that abort into one line saying what happened.

Importing this module does not import JAX: the CLI reads `process_label` before the
config is checked.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from vgg_jax import stderr_watch
from vgg_jax.preemption import PreemptionGuard, exit_status

if TYPE_CHECKING:
    import ml_collections

logger = logging.getLogger(__name__)

# A start-up wait longer than this is said, once, by every waiting process.
WAIT_NOTICE_SECONDS = 5.0

_process_index: int | None = None
_watcher: subprocess.Popen | None = None


class DistributedStartError(RuntimeError):
    """The processes of a run could not start together; `exit_code` is what the CLI
    returns (0 after SIGTERM, as for any stop on a signal)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def process_label() -> str:
    """This process's `stderr_watch.process_label`."""
    return stderr_watch.process_label(_process_index)


def lost_peer_message(error: BaseException) -> str | None:
    """The one line for an error of a collective operation in a distributed run (a peer
    died: its connections closed), else None."""
    if _process_index is None:
        return None
    text = " ".join(str(error).split())
    if not re.search(r"gloo|nccl|connection (closed|reset)|collective|UNAVAILABLE", text, re.I):
        return None
    return (
        f"a collective operation with the other processes failed ({text[:300]}): another "
        f"process died or is unreachable, so this process stopped; {stderr_watch.RERUN}"
    )


def start(config: ml_collections.ConfigDict, guard: PreemptionGuard | None = None) -> None:
    """`jax.distributed.initialize` with the config's timeouts, when `config.distributed`.
    SIGTERM or Ctrl-C (seen by `guard`) ends the wait for the other processes. Then only
    process 0 logs below WARNING (the processes would print the same epoch lines)."""
    global _process_index
    if not config.distributed:
        return
    _watch_stderr(config)
    import jax

    _initialize_interruptibly(config, guard)
    _process_index = jax.process_index()
    if _watcher is not None:  # the watcher names the process in its message
        sys.stderr.flush()
        os.write(2, stderr_watch.CONTROL + f"{_process_index}\n".encode())
    if _process_index > 0:
        quiet = logging.getLogger("vgg_jax")
        quiet.setLevel(max(quiet.getEffectiveLevel(), logging.WARNING))


def _initialize_interruptibly(
    config: ml_collections.ConfigDict, guard: PreemptionGuard | None
) -> None:
    """Runs `jax.distributed.initialize` in a thread: the wait for the other processes is
    one blocking C++ call, during which this thread could not answer a signal. Says what
    it waits for once the wait is long enough to be noticed."""
    import jax

    failure: list[BaseException] = []

    def initialize() -> None:
        try:
            jax.distributed.initialize(
                # None fields are auto-detected (Slurm, Open MPI, cloud TPU/GPU environments).
                coordinator_address=config.coordinator_address,
                num_processes=config.num_processes,
                process_id=config.process_id,
                initialization_timeout=config.distributed_init_timeout_seconds,
                heartbeat_timeout_seconds=config.distributed_heartbeat_timeout_seconds,
            )
        except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
            failure.append(error)

    thread = threading.Thread(target=initialize, name="jax-distributed-initialize", daemon=True)
    thread.start()
    notice_at = time.monotonic() + WAIT_NOTICE_SECONDS
    while thread.is_alive():
        thread.join(0.2)
        if notice_at and time.monotonic() > notice_at:
            notice_at = 0.0
            logger.info(
                "distributed: waiting for every process to connect to the coordinator (%s), "
                "up to %s s (distributed_init_timeout_seconds)",
                config.coordinator_address or "auto-detected",
                config.distributed_init_timeout_seconds,
            )
        if guard is not None and guard.requested and thread.is_alive():
            raise DistributedStartError(
                f"stopped by signal {guard.signal_number} while waiting for the other "
                "processes of the run; nothing was trained",
                exit_status(guard.signal_number),
            )
    if failure:
        text = " ".join(str(failure[0]).split())
        raise DistributedStartError(
            f"jax.distributed.initialize failed: {type(failure[0]).__name__}: {text}"
        ) from failure[0]


def _watch_stderr(config: ml_collections.ConfigDict) -> None:
    """Points this process's stderr (file descriptor 2, so C++ writes too) at a pipe
    read by `vgg_jax.stderr_watch`, which writes to the original stderr. The watcher
    ignores SIGINT and SIGTERM and ends when every writer of the pipe has closed it."""
    if os.environ.get("VGG_JAX_STDERR_WATCH", "1") == "0":
        return
    command = [
        sys.executable,
        "-m",
        "vgg_jax.stderr_watch",
        f"--process={'' if config.process_id is None else config.process_id}",
        f"--coordinator={config.coordinator_address or ''}",
        f"--init-timeout={config.distributed_init_timeout_seconds}",
        f"--heartbeat-timeout={config.distributed_heartbeat_timeout_seconds}",
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    global _watcher
    _watcher = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=2, stderr=2)
    os.dup2(_watcher.stdin.fileno(), 2)
    _watcher.stdin.close()  # fd 2 is now the only write end this process holds
    _exit_on_abort()


def _exit_on_abort() -> None:
    """Makes abort() end this process with status 6 (SIGABRT's number) instead of by the
    signal: after the watcher's line, no core dump, no Python fault-handler dump and no
    'Aborted' from the shell. The handler is libc's own `_exit`: nothing else is safe
    to run in a signal handler of a thread that holds no Python lock."""
    import ctypes
    import ctypes.util
    import signal

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
        libc.signal(signal.SIGABRT, ctypes.cast(libc._exit, ctypes.c_void_p))
    except (OSError, AttributeError):  # not glibc-like: the abort stays as it was
        pass
