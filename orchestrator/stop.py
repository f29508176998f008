"""Stopping a run cleanly on SIGTERM (`ray job stop`, Kubernetes) or SIGINT (Ctrl-C).

The signal is noted, and the run loop stops after the step in hand and writes a final checkpoint.
A rollout holds nothing that cannot be redone, so while one runs (``interruptible``) the signal
also interrupts it at once: `ray job stop` gives the job 3 s before SIGKILL by default
(RAY_JOB_STOP_WAIT_TIME_S on the head raises it), and a rollout may take far longer.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class StopRequested(Exception):
    """Raised inside an interruptible section when a stop signal arrives."""


class GracefulStop:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._interruptible = False
        # Python delivers signals to the main thread only; a run started elsewhere (a test's
        # thread) keeps the default handlers.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._handle)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.requested and not self._interruptible:
            raise KeyboardInterrupt  # a second signal: stop now, without the final checkpoint
        self.signal_name = signal.Signals(signum).name
        if self._interruptible:
            self._interruptible = False  # a second signal during cleanup must not interrupt it
            raise StopRequested(self.signal_name)

    @contextmanager
    def interruptible(self):
        if self.requested:
            raise StopRequested(self.signal_name)
        self._interruptible = True
        try:
            yield
        except Exception as err:
            # The handler's StopRequested raised inside C code (Ray's wait checks for signals) comes
            # out as a SystemError caused by it: it is still the stop.
            if not isinstance(err, StopRequested) and _caused_by_stop(err):
                raise StopRequested(self.signal_name) from err
            raise
        finally:
            self._interruptible = False


def _caused_by_stop(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, StopRequested):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False
