"""Stopping a run cleanly: SIGTERM / SIGINT end training at the next optimizer step with a checkpoint saved, and the
workers of a multi-process launch die with their launcher.

In the training loop a SIGTERM or SIGINT (Ctrl-C) only sets a flag; at the end of the next step every process agrees
on it (a non-blocking all-reduce of one CPU integer, started one step earlier, so no step waits for it), the
checkpoint is saved and training stops; the recipe then exits with `128 + signal` without exporting anything. A
second Ctrl-C, or a signal outside the training loop, stops the process at once (more SIGTERMs are ignored: a
launcher with several threads that dies sends one per thread). Stopping at once raises `SystemExit(128 + signal)` (or
`KeyboardInterrupt`) so that `finally` blocks (the output lock) run; Python delivers signals between any two bytecodes,
and when that is inside a finalizer (`__del__`, a weakref callback) it prints the exception as "Exception ignored" and
goes on: the exception is then raised again as soon as the finalizer has returned. Workers started by
`accelerate launch` / `torchrun` ask the kernel for a SIGTERM when their launcher dies (`PR_SET_PDEATHSIG`), so
killing the launcher (even with `kill -9`) stops them the same way.
"""

import _thread
import ctypes
import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


class TrainingStopped(SystemExit):
    """Training was stopped by a signal after saving a checkpoint; the exit status is `128 + signal`."""


def die_with_launcher() -> None:
    """In a worker started by a launcher (torchrun / `accelerate launch` set `LOCAL_RANK`), get SIGTERM when the
    launcher dies. Linux only; a no-op elsewhere."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _trip_soon(signum: int) -> None:
    """Make the main thread run the handler of `signum` at its next bytecode, in a millisecond (from another thread:
    `threading.Thread.start` would wait for it in the main thread, where the handler would then run)."""
    time.sleep(0.001)
    _thread.interrupt_main(signum)


class GracefulStop(TrainerCallback):
    """Turns SIGTERM / SIGINT into "save a checkpoint and stop" at the next step (see the module docstring)."""

    def __init__(self):
        self.signal = None  # the signal received
        self.stopped_at = None  # the step training stopped at because of it
        self._in_training = False
        self._previous = {}
        self._group = None
        self._pending = None
        self._stop_now = None  # the exception that stops the process at once, once raised
        self._previous_unraisablehook = None
        self._in_unraisable_hook = False
        self._handler_after_stop = signal.SIG_DFL

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        self._previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._previous_unraisablehook is not None and self._stop_now is None:
            sys.unraisablehook = self._previous_unraisablehook
            self._previous_unraisablehook = None

    def _handle(self, signum, frame):
        if not self._in_training or (self.signal is not None and signum == signal.SIGINT):
            logger.warning("Received %s: stopping now.", signal.Signals(signum).name)
            self._stop_now = KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
            self.uninstall()
            raise self._stop_now
        if self.signal is not None:  # e.g. SIGTERM sent again by a scheduler, or once per thread of a dying launcher
            return
        self.signal = signum
        logger.warning(
            "Received %s: stopping after this step with a checkpoint saved%s.",
            signal.Signals(signum).name,
            " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
        )

    def _unraisable(self, unraisable) -> None:
        """The exit was raised inside a finalizer, which Python ignores: raise it again in the main thread once the
        finalizer has returned: another thread trips the signal, and a trip that arrives while this hook still runs is
        made again, since an exception raised in the hook would be ignored too."""
        stop = self._stop_now
        if stop is None or unraisable.exc_value is not stop:
            (self._previous_unraisablehook or sys.__unraisablehook__)(unraisable)
            return
        self._in_unraisable_hook = True
        signum = signal.SIGINT if isinstance(stop, KeyboardInterrupt) else stop.code - 128
        if signal.getsignal(signum) != self._raise_again:
            self._handler_after_stop = signal.getsignal(signum)
            signal.signal(signum, self._raise_again)
        _thread.start_new_thread(_trip_soon, (signum,))
        self._in_unraisable_hook = False

    def _raise_again(self, signum, frame):
        if self._in_unraisable_hook:
            _thread.start_new_thread(_trip_soon, (signum,))
            return
        signal.signal(signum, self._handler_after_stop)
        raise self._stop_now

    def on_train_begin(self, args, state, control, **kwargs):
        self._in_training = True
        if args.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # one CPU integer per step: no device synchronization

    def _agreed_stop(self) -> bool:
        """Whether any process had received a signal one step ago (the same answer on every process)."""
        if self._group is None:
            return self.signal is not None
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()  # started a step ago: long done
            agreed = bool(flag[0])
        flag = torch.tensor([0 if self.signal is None else 1], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed_stop() and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        self._in_training = False
