"""One trainer per workdir: an exclusive lock on WORKDIR/.lock, held while training.

The lock is the kernel's (flock): it is released when the holder exits, however it
exits, so a crashed run never leaves a stale lock behind. The file also names the holder
(host, pid, start time) so that a second trainer can say who has the workdir. Only
process 0 of a multi-host run takes it: the processes of one run share the workdir.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another trainer holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"{os.path.dirname(self.path)} is in use by another trainer ({holder}); "
                "wait for it to finish or use another --workdir"
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.ctime()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError):
        return "holder unknown"
