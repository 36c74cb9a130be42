"""A signal outside the training loop stops the process, even when Python delivers it inside a finalizer (`__del__`,
a weakref callback), where an exception raised by a signal handler is printed as "Exception ignored" and lost."""

import signal
import subprocess
import sys
import textwrap

import pytest

from .test_restarts import ENV

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time, weakref
    from hf_distill.restarts import GracefulStop

    stopper = GracefulStop()
    stopper.install()
    where = sys.argv[1]

    class Holder:
        pass

    def send_and_wait(*_):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecodes: the handler runs here, inside the finalizer
            pass

    if where == "__del__":
        Holder.__del__ = send_and_wait
        holder = Holder()
    else:
        holder = Holder()
        keep = weakref.ref(holder, send_and_wait)
    try:
        del holder
        time.sleep(0.5)
        print("CONTINUED AFTER SIGTERM", flush=True)
    finally:
        print("CLEANUP RAN", flush=True)  # the exit unwinds the stack: finally blocks (e.g. lock release) run
    """
)


@pytest.mark.parametrize("where", ["__del__", "weakref-callback"])
def test_sigterm_delivered_in_a_finalizer_still_stops_the_process(where, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), where], env=ENV, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 128 + signal.SIGTERM, output
    assert "CONTINUED AFTER SIGTERM" not in output, output
    assert "CLEANUP RAN" in output and "Received SIGTERM: stopping now" in output, output
