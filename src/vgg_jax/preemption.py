"""SIGTERM / Ctrl-C: let the current step finish, then save and stop cleanly."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

SECOND_INTERRUPT_MESSAGE = "interrupted (second Ctrl-C): stopped without saving"


def exit_status(signal_number: int) -> int:
    """What a command stopped by `signal_number` returns: 0 on SIGTERM so that schedulers
    treat the job as cleanly stopped and restart it; 128 + N otherwise (130 on Ctrl-C),
    the shell's convention for an interrupted command."""
    return 0 if signal_number == signal.SIGTERM else 128 + signal_number


class Preempted(Exception):  # noqa: N818 (it is a state, not a failure)
    """Training stopped on a signal after saving; `exit_code` is what the CLI returns."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.signal_number = signal_number
        self.exit_code = exit_status(signal_number)


class PreemptionGuard:
    """Within `with PreemptionGuard() as guard:`, SIGTERM and SIGINT only set
    `guard.signal_number`; the training loop polls it between steps. A second Ctrl-C
    restores the default behaviour, so an impatient user can still stop at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, exit_on_second_interrupt: bool = False):
        # A KeyboardInterrupt raised from a signal handler is lost when it lands in a
        # garbage-collector callback or a __del__ (Python prints and ignores it there),
        # and the run then goes on. A command-line program exits at once instead; in a
        # notebook the kernel must survive, so the library default raises.
        self.exit_on_second_interrupt = exit_on_second_interrupt
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if self.signal_number is not None and signal_number == signal.SIGINT:
            if self.exit_on_second_interrupt:
                # os.write: a buffered print could re-enter a write the step was making.
                os.write(2, f"{SECOND_INTERRUPT_MESSAGE}\n".encode())
                os._exit(exit_status(signal.SIGINT))
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signal_number = signal_number

    def install(self) -> PreemptionGuard:
        """Takes over SIGTERM and SIGINT (once; only the main thread can)."""
        if not self._previous and threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
            # Blocked across the CLIs' restart (cpu/host_memory.py): a signal that arrived
            # then is delivered now, to the handlers.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()
