"""Starting a run of several processes (`config.distributed`): bounded waits, and one
line when a peer is lost.

JAX's distributed service ends a process from C++ when the processes of a run do not
all connect in time, when a peer stops sending heartbeats, and when the coordinator
(process 0) is gone: a fatal log line with the status, a C++ stack trace and Python's
dump of every thread (60 to 70 lines). No documented JAX API replaces that abort (its
`missed_heartbeat_callback` is internal to jaxlib), so this process's stderr passes
through a watcher process (`python -m vgg_jax.distributed`, `Watch`) that forwards every
line as it comes and turns the abort into one line. The coordination service's error
lines come a millisecond before the fatal one, so error-level C++ lines are held back
for HOLD_SECONDS and dropped if the fatal line follows.

Importing this module does not import JAX: the CLI reads `process_label` before the
config is checked.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vgg_jax.preemption import PreemptionGuard, exit_status

if TYPE_CHECKING:
    import ml_collections

logger = logging.getLogger(__name__)

# A start-up wait longer than this is said, once, by every waiting process.
WAIT_NOTICE_SECONDS = 5.0
FATAL_MARK = b"Terminating process because the JAX distributed service detected fatal errors"
STACK_MARK = b"*** Check failure stack trace ***"
ERROR_LOG_LINE = re.compile(rb"^[EF]\d{4} \d\d:\d\d:\d\d")
HOLD_SECONDS = 2.0
# Written by `start` once JAX knows the process index (auto-detected on Slurm), so that
# the watcher's message names the process: CONTROL + b"INDEX\n".
CONTROL = b"\0vgg-jax-process "
RERUN = "rerun the same command for every process to resume from the last checkpoint"

_process_index: int | None = None
_watcher: subprocess.Popen | None = None


class DistributedStartError(RuntimeError):
    """The processes of a run could not start together; `exit_code` is what the CLI
    returns (0 after SIGTERM, as for any stop on a signal)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def process_label(index: int | None = None) -> str:
    """'[process N] ' for every process but the first of a distributed run, else ''; N is
    `index`, by default this process's index."""
    index = _process_index if index is None else index
    return f"[process {index}] " if index else ""


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
        f"process died or is unreachable, so this process stopped; {RERUN}"
    )


def start(config: ml_collections.ConfigDict, guard: PreemptionGuard | None = None) -> None:
    """`jax.distributed.initialize` with the config's timeouts, when `config.distributed`.
    SIGTERM or Ctrl-C (seen by `guard`) ends the wait for the other processes, a long wait
    is said once. Then only process 0 logs below WARNING (the processes would print the
    same epoch lines)."""
    global _process_index
    if not config.distributed:
        return
    _watch_stderr(config)
    import jax

    _initialize_interruptibly(config, guard)
    _process_index = jax.process_index()
    if _watcher is not None:  # the watcher names the process in its message
        sys.stderr.flush()
        os.write(2, CONTROL + f"{_process_index}\n".encode())
    if _process_index > 0:
        quiet = logging.getLogger("vgg_jax")
        quiet.setLevel(max(quiet.getEffectiveLevel(), logging.WARNING))


def _initialize_interruptibly(
    config: ml_collections.ConfigDict, guard: PreemptionGuard | None
) -> None:
    """`jax.distributed.initialize` in a thread: the wait for the other processes is one
    blocking C++ call, during which this thread could not answer a signal."""
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
    read by the watcher (`main` below), which writes to the original stderr. The watcher
    ignores SIGINT and SIGTERM and ends when every writer of the pipe has closed it."""
    if os.environ.get("VGG_JAX_STDERR_WATCH", "1") == "0":
        return
    command = [
        sys.executable,
        "-m",
        "vgg_jax.distributed",
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
    # abort() then ends this process with status 6 (SIGABRT's number), not by the signal:
    # after the watcher's line, no core dump, no Python fault-handler dump and no
    # 'Aborted' from the shell. The handler is libc's own `_exit`: nothing else is safe
    # to run in a signal handler of a thread that holds no Python lock.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
        libc.signal(signal.SIGABRT, ctypes.cast(libc._exit, ctypes.c_void_p))
    except (OSError, AttributeError):  # not glibc-like: the abort stays as it was
        pass


class Watch:
    """Feeds bytes through, holding back C++ error lines for `HOLD_SECONDS`; `write`
    gets what passes."""

    def __init__(self, write: Callable[[bytes], None], process: int | None, settings: dict):
        self.write = write
        self.process = process
        self.settings = settings
        self.tail = b""  # an unfinished line
        self.held: list[bytes] = []
        self.held_since = 0.0
        self.fatal: list[bytes] | None = None  # the fatal line and its status, once seen
        self.done = False  # the one line is out: drop the rest

    def feed(self, data: bytes, now: float) -> None:
        lines = (self.tail + data).split(b"\n")
        self.tail = lines.pop()
        for line in lines:
            self._line(line + b"\n", now)
        # An unfinished line (a progress bar's carriage-return update) passes at once,
        # unless it may be the start of a C++ error line or of a control line.
        passing = not self.held and self.fatal is None and not self.done
        if self.tail and passing and self.tail[:1] not in (b"E", b"F"):
            cut = self.tail.find(CONTROL[:1])
            cut = len(self.tail) if cut < 0 else cut
            self.write(self.tail[:cut])
            self.tail = self.tail[cut:]

    def tick(self, now: float) -> None:
        if self.held and now - self.held_since >= HOLD_SECONDS:
            self.write(b"".join(self.held))
            self.held = []

    def finish(self) -> None:
        if self.fatal is not None and not self.done:
            self._emit()
        elif not self.done:
            self.write(b"".join(self.held) + self.tail)
        self.held, self.tail = [], b""

    def _line(self, line: bytes, now: float) -> None:
        if CONTROL in line:
            before, _, control = line.partition(CONTROL)
            self.process = int(control.split()[0])
            line = before
        if self.done or not line:
            return
        if self.fatal is not None:
            self.fatal.append(line)
            if STACK_MARK in line:
                self._emit()
        elif FATAL_MARK in line:
            self.fatal, self.held = [line], []
        elif self.held or ERROR_LOG_LINE.match(line):
            if not self.held:
                self.held_since = now
            self.held.append(line)
        else:
            self.write(line)

    def _emit(self) -> None:
        self.write((self.message() + "\n").encode())
        self.done = True

    def message(self) -> str:
        """The one line for the fatal error seen."""
        text = b"".join(self.fatal or []).decode(errors="replace")
        who = process_label(self.process or 0)
        where = self.settings["coordinator"] or "the auto-detected coordinator"
        if "RegisterTask" in text:
            return (
                f"{who}error: the processes of the run did not all connect to {where} within "
                f"{self.settings['init_timeout']} s (distributed_init_timeout_seconds): start "
                "every process with the same coordinator_address and num_processes; nothing "
                "was trained"
            )
        lost = re.search(r"stopped sending heartbeats\):\s*([\d,\s]*\d)", text)
        if lost:
            ids = ", ".join(re.findall(r"\d+", lost.group(1)))
            return (
                f"{who}error: process {ids} of the run sent no heartbeat for "
                f"{self.settings['heartbeat_timeout']} s (distributed_heartbeat_timeout_seconds)"
                f": it died or is unreachable, so this process stopped; {RERUN}"
            )
        if "Failed to send RPC to coordination service" in text or "leader task" in text:
            return (
                f"{who}error: lost the coordinator (process 0, {where}): it died or is "
                f"unreachable, so this process stopped; {RERUN}"
            )
        status = text.partition("Status:")[2].strip().splitlines() or ["(no status)"]
        return (
            f"{who}error: JAX's distributed service stopped this process: {status[0].strip()}; "
            f"{RERUN}"
        )


def main(argv: list[str] | None = None) -> None:
    # Ctrl-C and SIGTERM are for the watched process, which may still have lines to say.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = argparse.ArgumentParser()
    for option in ("--process", "--coordinator", "--init-timeout", "--heartbeat-timeout"):
        parser.add_argument(option, default="")
    settings = vars(parser.parse_args(argv))
    watch = Watch(_write, int(settings["process"]) if settings["process"] else None, settings)
    while True:
        timeout = HOLD_SECONDS if watch.held else None
        if select.select([0], [], [], timeout)[0]:
            data = os.read(0, 65536)
            if not data:
                break
            watch.feed(data, time.monotonic())
        watch.tick(time.monotonic())
    watch.finish()


def _write(data: bytes) -> None:
    try:
        while data:
            data = data[os.write(1, data) :]
    except OSError:
        pass  # the terminal or pipe is gone: keep reading, so the process never blocks


if __name__ == "__main__":
    main()
