"""GracefulStop: a stop signal during an interruptible section stops it, however it surfaces."""
import os
import signal
import threading

import pytest

from orchestrator.stop import GracefulStop, StopRequested


@pytest.fixture
def stop():
    assert threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield GracefulStop()
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_interrupts_the_section_and_is_remembered(stop):
    with pytest.raises(StopRequested):
        with stop.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**6):  # the handler runs between bytecodes
                pass
    assert stop.requested and stop.signal_name == "SIGTERM"
    with pytest.raises(StopRequested):  # a later section stops at once
        with stop.interruptible():
            pass


def test_a_stop_raised_inside_c_code_and_wrapped_is_still_a_stop(stop):
    """Ray's wait runs the handler inside C code, and Python then reports a SystemError caused by
    the StopRequested (seen in the overlapped fault test): that is the stop, not a crash."""
    with pytest.raises(StopRequested) as raised:
        with stop.interruptible():
            try:
                stop._handle(signal.SIGTERM, None)  # what the signal runs, inside the C call
            except StopRequested as err:
                raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from err
    assert isinstance(raised.value.__cause__, SystemError)


def test_other_errors_pass_through(stop):
    with pytest.raises(ValueError):
        with stop.interruptible():
            raise ValueError("not a stop")
