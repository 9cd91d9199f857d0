"""``main.py --preflight`` on the ranks of ``paddle.distributed.launch`` where rank 1 alone
runs out of memory above 8 images a micro-batch (simulated, before any collective of its
step): run by tests/test_scaling.py with ``main.py``'s arguments; each rank prints its exit
code as its last line."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import engine  # noqa: E402

real_step = engine.train_step


def small_memory_on_rank_1(stage, images, *args):
    """``train_step``, out of memory on rank 1 above 8 images."""
    if os.environ.get("PADDLE_TRAINER_ID") == "1" and images.shape[0] > 8:
        raise MemoryError("Out of memory error on GPU 1 (simulated)")
    return real_step(stage, images, *args)


engine.train_step = small_memory_on_rank_1  # before preflight imports it

import main  # noqa: E402
from utils import cli  # noqa: E402

if __name__ == "__main__":
    try:
        with cli.one_line_errors():
            sys.exit(main.main(sys.argv[1:]))
    finally:
        print(f"exit {sys.exc_info()[1].code}", flush=True)
