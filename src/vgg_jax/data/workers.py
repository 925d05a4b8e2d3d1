"""Supervision of the stream's worker processes (docs/data.md): none outlives its parent
(`worker_init`), and a worker's death ends the run in one line instead of a hang
(`Supervisor`). A batch being piped when its writer died can leave the parent blocked in
a read forever, so the CLIs (`EXIT_ON_WORKER_DEATH`) end the process there, as a crash
the rerun resumes from; in a library call the next batch read raises `InputWorkerError`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

# Set by the CLIs: a dead worker ends the process (exit status 1) after its one line.
EXIT_ON_WORKER_DEATH = False
GRAIN_WORKER_PREFIX = "grain-process-prefetch"
POLL_SECONDS = 0.5
KILL_GRACE_SECONDS = 0.2


class InputWorkerError(RuntimeError):
    """An input worker process died while its stream was open."""


def worker_init(parent_pid: int):
    """grain's worker_init_fn: in a worker process, exit as soon as `parent_pid` is no
    longer its parent. A thread polling getppid (not PR_SET_PDEATHSIG, which fires when
    the thread that started the worker ends, not the process)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_SECONDS)
        os._exit(0)

    def init(index: int, count: int) -> None:
        del index, count
        threading.Thread(target=watch, name="vgg-jax-watch-parent", daemon=True).start()

    return init


def quiet_resource_tracker() -> None:
    """Starts multiprocessing's resource tracker (once per process) with its stderr on
    /dev/null: it removes what a crashed run leaves (semaphores in /dev/shm), but with a
    warning each time, and tracebacks when two processes unregister the same name."""
    from multiprocessing import resource_tracker

    if getattr(resource_tracker._resource_tracker, "_fd", None) is not None:
        return  # running already
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Polls this process's grain worker processes; reports one that dies unasked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.known: dict[int, multiprocessing.Process] = {}
        self.closing = 0
        self.error: str | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._run, name="vgg-jax-input-supervisor", daemon=True
                )
                self.thread.start()

    @contextlib.contextmanager
    def stopping(self):
        """Around closing a stream: its workers' exits are asked for, not failures."""
        with self.lock:
            self.closing += 1
        try:
            yield
        finally:
            # grain's close kills a worker that does not stop within its timeout (one
            # blocked on a full pipe: every stream of large batches, at its end) and
            # returns without waiting for it to die: give the kill time to land, so that
            # this exit is not reported later as a death.
            time.sleep(KILL_GRACE_SECONDS)
            with self.lock:
                self.known = {pid: p for pid, p in self.known.items() if p.exitcode is None}
                self.closing -= 1

    def check(self) -> None:
        """Raises InputWorkerError if a worker died (in library use)."""
        if self.error:
            raise InputWorkerError(self.error)

    def _run(self) -> None:
        while True:
            time.sleep(POLL_SECONDS)
            with self.lock:
                try:
                    children = multiprocessing.active_children()
                except RuntimeError:  # the children set changed while it was read
                    continue
                for child in children:
                    if (child.name or "").startswith(GRAIN_WORKER_PREFIX):
                        self.known.setdefault(child.pid, child)
                if self.closing:
                    continue
                dead = [p for p in self.known.values() if p.exitcode not in (None, 0)]
                if dead:
                    self._fail(dead[0])
                    return

    def _fail(self, process: multiprocessing.Process) -> None:
        self.error = (
            f"input worker process {process.pid} died ({describe_exit(process.exitcode)}): "
            "the run stops; rerun the same command to resume from the last checkpoint"
        )
        for other in self.known.values():  # the others would only wait for it
            if other.exitcode is None:
                with contextlib.suppress(OSError):
                    os.kill(other.pid, signal.SIGKILL)
        if EXIT_ON_WORKER_DEATH:
            logging.shutdown()
            sys.stderr.write(f"error: {self.error}\n")
            sys.stderr.flush()
            os._exit(1)
        logger.error("%s", self.error)


SUPERVISOR = Supervisor()
