"""What the command-line entry points share: the parser with -c/-o/--debug, and one line and
an exit code for every expected failure."""

import argparse
import contextlib
import errno
import os
import signal
import sys
import traceback
from typing import Callable, Iterator, Optional

from utils.config import DEFAULT_CONFIG
from utils.errors import Interrupted, UserError
from utils.runtime.signals import (
    HELD,
    exit_on_stop_signals,
    hold_sigterm,
    leave_closed_terminal,
)

# OS errors a user fixes (free space, fix permissions) rather than bugs: one line each.
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                  errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside training (where it stops the run with a checkpoint
    instead)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    if signum == signal.SIGHUP:
        leave_closed_terminal()
    raise Terminated(signum)


def _reopen_closed_standard_streams():
    """Give a closed standard input, output or error (``2>&-``) ``/dev/null``: the next file
    opened would otherwise take its number, and Paddle's C++ logging to descriptor 2 would
    write into it (an exported model, a checkpoint)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            name = ("stdin", "stdout", "stderr")[fd]
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, "r" if fd == 0 else "w", encoding="utf-8",
                                        closefd=False))


def _report(message, debug):
    if debug:
        traceback.print_exc()
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    try:
        print(f"error: {'; '.join(lines)}", file=sys.stderr)
    except OSError:  # no terminal left to say it on
        pass


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Around an entry point's ``sys.exit(main())``: the exit code it gives, or one
    ``error:`` line and a non-zero exit for every expected failure (:class:`UserError`, a
    full disk, a denied write, Ctrl-C outside training) without a traceback, unless
    ``--debug`` is among the arguments; an :class:`Interrupted` run exits 128 + signal.
    SIGTERM and SIGHUP are held until :func:`utils.runtime.device.select_device` has taken
    them back from Paddle's import."""
    debug = "--debug" in sys.argv[1:]
    _reopen_closed_standard_streams()
    for stream in (sys.stdout, sys.stderr):  # a class name a terminal cannot show: escaped
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    for signum in HELD:
        signal.signal(signum, _terminate)
    hold_sigterm(True)  # until select_device() has taken it back from Paddle's import
    try:
        try:
            yield
        finally:
            hold_sigterm(False)  # a SIGTERM still held arrives here
    except Interrupted as exc:
        exit_on_stop_signals(exc.exit_code)
        print(f"interrupted: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        _report(f"interrupted ({signal.Signals(signum).name}); nothing was saved", debug)
        code = 128 + signum
    except BrokenPipeError:  # `main.py --dry-run | head -1`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's last flush must not fail again
        code = 128 + signal.SIGPIPE
    except UserError as exc:
        _report(exc, debug)
        code = 2
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        _report(exc.strerror + (f": {exc.filename}" if exc.filename else ""), debug)
        code = 2
    except ValueError as exc:  # a path given with a NUL character, which no file name has
        if "null" not in str(exc):
            raise
        _report(f"a path holds a NUL character ({exc}); no file name can", debug)
        code = 2
    else:
        return
    sys.exit(code)


def run(main: Callable[[], Optional[int]]) -> None:
    """Call ``main()`` and exit with its code, failures as :func:`one_line_errors` says."""
    with one_line_errors():
        sys.exit(main() or 0)


def config_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by a script's docstring (first line, then the examples),
    with the shared ``-c/--config``, ``-o/--override`` and ``--debug`` options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                        help=f"YAML recipe, or a run's output folder for its config and "
                             f"weights (default: {DEFAULT_CONFIG})")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. -o data.batch_size=32 or "
                             "-o stages.0.optimizer.lr=1e-4 (repeatable; values are YAML)")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error instead of one line")
    return parser


def add_weights_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--weights PATH``, ``what`` they are for; the run's best weights by default."""
    parser.add_argument("--weights", metavar="PATH",
                        help=f"{what}: a weights file, or a run folder for its best weights "
                             f"(default: best.safetensors in train.output_dir)")
