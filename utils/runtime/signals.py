"""Stop a run cleanly on SIGINT (Ctrl-C), SIGTERM (what schedulers send before a kill) or
SIGHUP (a closed terminal or SSH session), and keep those signals with the Python handlers
once Paddle is imported."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Held back while Paddle is imported (its C++ handlers would print a dump), then delivered.
HELD = (signal.SIGTERM, signal.SIGHUP)
# A signal this soon after the first is its sender repeating itself, not a second request:
# paddle.distributed.launch sends SIGTERM to each rank's process group up to three times,
# 0.2 s apart (distributed/launch/utils/process_context.py, terminate).
REPEAT_WINDOW_S = 1.0


def _say(text):
    """Write ``text`` to standard error from a signal handler; a closed terminal is not an
    error there."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError):
        pass


def leave_closed_terminal() -> None:
    """After SIGHUP: send what would go to the terminal, which is gone, to /dev/null, so
    that the checkpoint and the messages after it do not fail on it (log files are kept)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream.isatty():
                os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass
    os.close(devnull)


class StopRequests:
    """While active, the first SIGINT/SIGTERM only records a request to stop, which the
    training loop honours at its next safe point (after the current optimizer step or
    evaluation batch) by saving a checkpoint; a second signal exits at once, keeping the
    checkpoint saved before it. Signals within ``REPEAT_WINDOW_S`` of the first are the same
    request.

    A signal handler that raised instead could interrupt an optimizer update halfway.
    """

    def __init__(self) -> None:
        self.signum = None
        self._first_at = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            leave_closed_terminal()
        if self.signum is not None:
            if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
                return
            _say(f"\nerror: second {name}: exiting now; the last saved checkpoint is kept\n")
            os._exit(128 + signum)
        self.signum, self._first_at = signum, time.monotonic()
        _say(f"\n{name}: stopping after the current step to save a checkpoint (send it "
             f"again to exit at once)\n")

    @property
    def requested(self) -> Optional[str]:
        """The name of the signal that asked to stop, or ``None``."""
        return signal.Signals(self.signum).name if self.signum is not None else None


def ignore_stop_signals() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP in this process (a loader worker): they are the
    training process's to handle."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def exit_on_stop_signals(code: int) -> None:
    """From now on SIGINT, SIGTERM and SIGHUP end this process at once with exit ``code``:
    for a run that has saved its checkpoint and is exiting anyway (a sender that repeats its
    signal must not turn the exit into a traceback)."""
    def _exit(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _exit)


def hold_sigterm(hold: bool) -> None:
    """Hold SIGTERM and SIGHUP back (``hold``) or let a held one arrive."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if hold else signal.SIG_UNBLOCK, HELD)


def reassert_handlers() -> None:
    """Importing Paddle installs C-level handlers (a SIGTERM prints a C++ "FatalError"
    dump); hand the signals back to the Python handlers in place, then let a SIGTERM held
    back by :func:`run` while Paddle was imported arrive."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not None:
                signal.signal(signum, handler)
        hold_sigterm(False)
