"""One trainer per workdir (docs/training.md): the kernel's flock on the workdir folder
and on WORKDIR/.lock, released when the holder exits, however it exits. The folder's
lock keeps a second trainer out even where `.lock` is deleted by hand (a folder cannot
be removed under a running trainer); `.lock` names the holder and is written again if
it disappears (`check`, once per epoch). Where a file system cannot lock a folder, the
file's lock alone is used, and `check` re-takes it or stops the run if another trainer
took it. Only process 0 of a run of several processes takes it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another trainer holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._folder_fd: int | None = None
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(self.workdir, exist_ok=True)
        folder_fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._lock(folder_fd)
            self._folder_fd = folder_fd
        except OSError as error:  # the file system cannot lock a folder
            logger.info(
                "cannot lock the folder %s (%s): locking %s only", self.workdir, error, LOCK_NAME
            )
            os.close(folder_fd)
        try:
            self._fd = self._lock_file()
        except BaseException:
            self.release()
            raise
        return self

    def _lock(self, fd: int) -> None:
        """Locks `fd` exclusively; where another process holds it, closes it and raises
        WorkdirBusyError."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusyError(
                f"{self.workdir} is in use by another trainer ({_read_holder(self.path)}); "
                "wait for it to finish or use another --workdir"
            ) from None

    def _lock_file(self) -> int:
        """Opens, locks and fills in WORKDIR/.lock (which older versions lock too)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._lock(fd)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.ctime()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return fd

    def check(self) -> None:
        """Writes WORKDIR/.lock again if it was removed or replaced since it was taken;
        without the folder's lock, WorkdirBusyError if another trainer has taken it."""
        if self._fd is None or _same_file(self.path, self._fd):
            return
        logger.warning("%s was removed while this run held it: written again", self.path)
        os.close(self._fd)
        self._fd = None
        self._fd = self._lock_file()

    def release(self) -> None:
        if self._fd is not None and _same_file(self.path, self._fd):
            os.ftruncate(self._fd, 0)
        for fd in (self._fd, self._folder_fd):
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self._fd = self._folder_fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _same_file(path: str, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (not removed nor replaced)."""
    with contextlib.suppress(OSError):
        here, held = os.stat(path), os.fstat(fd)
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)
    return False


def _read_holder(path: str) -> str:
    try:
        with open(path) as f:
            holder = json.loads(f.read(4096) or "{}")
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
