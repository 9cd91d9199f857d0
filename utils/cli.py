"""What the command-line entry points share: quiet imports, device choice, seeding, errors."""

import random
import sys
import warnings

import numpy as np

# Paddle warns about a missing C++ compiler cache on import; this project builds no extension.
warnings.filterwarnings("ignore", message="No ccache found")

from utils.errors import UserError  # noqa: E402


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


def run(main):
    """Call ``main()`` and exit with its code; a :class:`UserError` becomes one ``error:`` line."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)
