"""What the command-line entry points share: quiet imports, device choice, seeding, errors."""

import errno
import random
import sys
import traceback
import warnings

import numpy as np

# Paddle warns about a missing C++ compiler cache on import; this project builds no extension.
warnings.filterwarnings("ignore", message="No ccache found")

from utils.errors import Interrupted, UserError  # noqa: E402

# OS errors a user fixes (free space, fix permissions) rather than bugs: one line each.
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def select_device():
    """Use the GPU when Paddle is built with CUDA and sees one, the CPU otherwise; return its name."""
    import paddle

    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        paddle.set_device("gpu")
    else:
        paddle.set_device("cpu")
    return paddle.get_device()


def seed_everything(seed):
    """Seed Paddle (weights, dropout), NumPy and Python's ``random``."""
    import paddle

    paddle.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(*keys):
    """A 32-bit seed derived from integers (seed, epoch, step, ...), stable across runs."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


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
    try:
        code = main()
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        _report("interrupted (SIGINT)", debug)
        code = 130
    except UserError as exc:
        _report(exc, debug)
        code = 2
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        _report(f"{exc.strerror}: {exc.filename}", debug)
        code = 2
    sys.exit(code or 0)
