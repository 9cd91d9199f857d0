"""Stop a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers send before a kill), and
keep those signals with the Python handlers once Paddle is imported."""

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """While active, the first SIGINT/SIGTERM only records a request to stop, which the
    training loop honours at its next safe point (after the current optimizer step or
    evaluation batch) by saving a checkpoint; a second signal exits at once, keeping the
    checkpoint saved before it.

    A signal handler that raised instead could interrupt an optimizer update halfway.
    """

    def __init__(self):
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
        if self.signum is not None:
            os.write(sys.stderr.fileno(),
                     f"\nerror: second {name}: exiting now; the last saved checkpoint is "
                     f"kept\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(sys.stderr.fileno(),
                 f"\n{name}: stopping after the current step to save a checkpoint (send it "
                 f"again to exit at once)\n".encode())

    @property
    def requested(self):
        """The name of the signal that asked to stop, or ``None``."""
        return signal.Signals(self.signum).name if self.signum is not None else None


def hold_sigterm(hold):
    """Hold SIGTERM back (``hold``) or let a held one arrive."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if hold else signal.SIG_UNBLOCK,
                               [signal.SIGTERM])


def reassert_handlers():
    """Importing Paddle installs C-level handlers (a SIGTERM prints a C++ "FatalError"
    dump); hand the signals back to the Python handlers in place, then let a SIGTERM held
    back by :func:`run` while Paddle was imported arrive."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler is not None:
                signal.signal(signum, handler)
        hold_sigterm(False)
