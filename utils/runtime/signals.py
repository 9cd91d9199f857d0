"""Stop a run cleanly on SIGINT (Ctrl-C), SIGTERM (what schedulers send before a kill) or
SIGHUP (a closed terminal or SSH session), and keep those signals with the Python handlers
once Paddle is imported."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Held back while Paddle is imported (its C++ handlers would print a dump), then delivered.
HELD = (signal.SIGTERM, signal.SIGHUP)


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
    checkpoint saved before it.

    A signal handler that raised instead could interrupt an optimizer update halfway.
    """

    def __init__(self) -> None:
        self.signum = None
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
            _say(f"\nerror: second {name}: exiting now; the last saved checkpoint is kept\n")
            os._exit(128 + signum)
        self.signum = signum
        _say(f"\n{name}: stopping after the current step to save a checkpoint (send it "
             f"again to exit at once)\n")

    @property
    def requested(self) -> Optional[str]:
        """The name of the signal that asked to stop, or ``None``."""
        return signal.Signals(self.signum).name if self.signum is not None else None


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
