"""What the command-line entry points share: quiet imports, device choice, signals, errors."""

import errno
import resource
import signal
import sys
import threading
import traceback

from utils.errors import Interrupted, UserError

# OS errors a user fixes (free space, fix permissions) rather than bugs: one line each.
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training (where it stops the run with a checkpoint instead)."""


def _terminate(signum, frame):
    raise Terminated


def _reassert_signal_handlers():
    """Importing Paddle installs C-level handlers (a SIGTERM prints a C++ "FatalError"
    dump); hand the signals back to the Python handlers in place, then let a SIGTERM held
    back by :func:`run` while Paddle was imported arrive."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler is not None:
                signal.signal(signum, handler)
        _hold_sigterm(False)


def _hold_sigterm(hold):
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK if hold else signal.SIG_UNBLOCK,
                               [signal.SIGTERM])


def select_device():
    """Use the GPU when Paddle is built with CUDA and sees one, the CPU otherwise; return its name."""
    import paddle

    _reassert_signal_handlers()

    paddle.set_device("gpu" if gpu_visible() else "cpu")
    return paddle.get_device()


def peak_memory_bytes(device):
    """The process's peak memory so far: Paddle's max allocated on a GPU, the peak resident
    set on a CPU."""
    import paddle

    if str(device).startswith("gpu"):
        return int(paddle.device.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def gpu_visible():
    """Whether this Paddle is built with CUDA and sees a GPU."""
    import paddle

    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def _report(message, debug):
    if debug:
        traceback.print_exc()
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines)}", file=sys.stderr)


def run(main):
    """Call ``main()`` and exit with its code.

    Expected failures (:class:`UserError`, a full disk, a denied write, Ctrl-C outside
    training) print one ``error:`` line and exit non-zero without a traceback, unless
    ``--debug`` is among the arguments; an :class:`Interrupted` run exits 128 + signal.
    """
    debug = "--debug" in sys.argv[1:]
    signal.signal(signal.SIGTERM, _terminate)
    _hold_sigterm(True)  # until select_device() has taken it back from Paddle's import
    try:
        try:
            code = main()
        finally:
            _hold_sigterm(False)  # a SIGTERM still held arrives here
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt as exc:
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        _report(f"interrupted ({signal.Signals(signum).name}); nothing was saved", debug)
        code = 128 + signum
    except UserError as exc:
        _report(exc, debug)
        code = 2
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        _report(exc.strerror + (f": {exc.filename}" if exc.filename else ""), debug)
        code = 2
    sys.exit(code or 0)
