"""StopFlag: a stop signal wakes the main thread whichever thread the kernel gives it to."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

# The signal goes to a thread other than the main one, as the kernel may
# deliver a process-directed signal to the agent's thread: a main thread
# blocked in threading.Event.wait() would sleep through it.
_PROGRAM = textwrap.dedent(
    """
    import signal, sys, threading
    from burrow.stop import StopFlag

    stop = StopFlag()
    stop.install()
    how = sys.argv[1]

    def other_thread() -> None:
        if how == "set":
            stop.set()
        else:
            signal.pthread_kill(threading.get_ident(), getattr(signal, how))

    threading.Timer(0.2, other_thread).start()
    woke = stop.wait(60)
    print(woke, stop.signal)
    """
)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP", "set"])
def test_stop_flag_wakes_the_main_thread(how: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROGRAM, how],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    expected = "None" if how == "set" else str(int(getattr(signal, how)))
    assert result.stdout.split() == ["True", expected]
