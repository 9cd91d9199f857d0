"""Progress of long loops: live bars where a person watches, plain lines in a log file.

A tqdm bar redraws one line with carriage returns: in a terminal or a notebook that is a
live bar, in a file (``nohup``, AI Studio background jobs) it is one ever longer line.
``train.progress`` chooses: ``auto`` (bars on a terminal or in a notebook, else a line every
``LINE_INTERVAL_S`` seconds), ``bars``, ``lines`` or ``off``.
"""

import contextlib
import sys
import time

from tqdm import tqdm

from utils.runtime.dist import is_main

LINE_INTERVAL_S = 60
MODES = ("auto", "bars", "lines", "off")
_mode = "auto"


def set_mode(mode):
    """Choose how loops report progress from now on (one of :data:`MODES`)."""
    global _mode
    _mode = mode


@contextlib.contextmanager
def silenced():
    """No progress reports inside the block (short trial loops)."""
    global _mode
    saved, _mode = _mode, "off"
    try:
        yield
    finally:
        _mode = saved


def _watched():
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def track(iterable, desc):
    """``iterable`` wrapped to report its progress per the mode; the result also takes
    ``set_postfix(**values)`` (shown on the bar or the line)."""
    mode = _mode if _mode != "auto" else "bars" if _watched() else "lines"
    if not is_main():  # rank 0 reports for all
        mode = "off"
    if mode == "bars":
        return tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=1.0)
    return _Lines(iterable, desc, every=LINE_INTERVAL_S if mode == "lines" else None)


class _Lines:
    """An iterable that prints ``desc: i/n (p%), rate, postfix`` every ``every`` seconds
    (never with ``every=None``)."""

    def __init__(self, iterable, desc, every):
        self.iterable, self.desc, self.every, self.postfix = iterable, desc, every, {}

    def set_postfix(self, refresh=False, **values):
        self.postfix = values

    def __iter__(self):
        total = len(self.iterable) if hasattr(self.iterable, "__len__") else None
        start = last = time.perf_counter()
        for done, item in enumerate(self.iterable, 1):
            yield item
            now = time.perf_counter()
            if self.every is not None and now - last >= self.every:
                last = now
                share = f"/{total} ({100 * done / total:.0f}%)" if total else ""
                extra = "".join(f", {key} {value}" for key, value in self.postfix.items())
                print(f"{self.desc}: {done}{share}, {done / (now - start):.2f} it/s{extra}",
                      file=sys.stderr, flush=True)
