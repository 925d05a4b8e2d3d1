"""The stderr of a process of a distributed run, passed on as it comes, except JAX's
fatal abort, which becomes one line (see `vgg_jax.distributed`).

  python -m vgg_jax.stderr_watch --process=ID --coordinator=HOST:PORT \
      --init-timeout=S --heartbeat-timeout=S  < the process's stderr

The abort is a C++ fatal log line ("Terminating process because the JAX distributed
service detected fatal errors", with the status on the lines after it), a C++ stack
trace and Python's dump of every thread; error lines of the coordination service come a
millisecond before it. So error-level C++ log lines are held back for a moment: when
the fatal line follows they are dropped with the rest, otherwise passed on.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import time
from collections.abc import Callable

FATAL_MARK = b"Terminating process because the JAX distributed service detected fatal errors"
STACK_MARK = b"*** Check failure stack trace ***"
ERROR_LOG_LINE = re.compile(rb"^[EF]\d{4} \d\d:\d\d:\d\d")
# The coordination service's error lines precede the fatal line by about a millisecond.
HOLD_SECONDS = 2.0
# Written by `vgg_jax.distributed` once JAX knows the process index (auto-detected on
# Slurm), so that the message names the process: CONTROL + b"INDEX\n".
CONTROL = b"\0vgg-jax-process "
RERUN = "rerun the same command for every process to resume from the last checkpoint"


def process_label(index: int | None) -> str:
    """'[process N] ' for every process but the first of a distributed run, else ''."""
    return f"[process {index}] " if index else ""


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
        who = process_label(self.process)
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
