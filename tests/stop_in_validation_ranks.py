"""``main.py`` on the ranks of ``paddle.distributed.launch`` where rank 0 alone gets a SIGTERM
at the second batch of the first validation (run by tests/test_scaling.py with main.py's
arguments): the ranks must agree to stop inside the pass. Each rank prints (to standard
error) how many validation batches it took."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.reports import progress  # noqa: E402

real_track, seen = progress.track, []


class _Signalling:
    """The validation's tracked batches; on rank 0, SIGTERM to itself at the 2nd batch of the
    first validation."""

    def __init__(self, tracked):
        self.tracked = tracked

    def set_postfix(self, **values):
        self.tracked.set_postfix(**values)

    def __iter__(self):
        for item in self.tracked:
            seen.append(1)
            if os.environ.get("PADDLE_TRAINER_ID") == "0" and len(seen) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            yield item


def track_then_signal(iterable, desc):
    """``track``, counting (and on rank 0 signalling in) the validation's batches."""
    tracked = real_track(iterable, desc)
    return _Signalling(tracked) if desc == "val" else tracked


import training.engine as engine  # noqa: E402

engine.track = track_then_signal

import main  # noqa: E402
from utils import cli  # noqa: E402

if __name__ == "__main__":
    try:
        with cli.one_line_errors():
            sys.exit(main.main(sys.argv[1:]))
    finally:
        # to standard error: the other ranks' standard output is dropped
        print(f"validation batches {len(seen)}", file=sys.stderr, flush=True)
