"""Progress of long loops: live bars where a person watches, plain lines in a log file.

A tqdm bar redraws one line with carriage returns: in a terminal that is a live bar, in a
file (``nohup``, AI Studio background jobs) it is one ever longer line.
``train.progress`` chooses: ``auto`` (bars on a terminal or in a notebook, else a line every
``LINE_INTERVAL_S`` seconds), ``bars``, ``lines`` or ``off``.

In a notebook every write is an output of its own once the notebook is saved (papermill
keeps each redraw of a bar, and each epoch line between them), so :func:`one_output` gathers
what a block prints into one output that is updated in place.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import textwrap
import time
from typing import Any, Iterable, Iterator, Optional

from tqdm import tqdm

LINE_INTERVAL_S = 60
MODES = ("auto", "bars", "lines", "off")
_mode = "auto"


def set_mode(mode: str) -> None:
    """Choose how loops report progress from now on (one of :data:`MODES`)."""
    global _mode
    _mode = mode


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """No progress reports inside the block (short trial loops)."""
    global _mode
    saved, _mode = _mode, "off"
    try:
        yield
    finally:
        _mode = saved


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (not merely a process that imported one, as
    papermill's caller does)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _watched():
    return sys.stderr.isatty() or in_notebook()


def track(iterable: Iterable, desc: str) -> Iterable:
    """``iterable`` wrapped to report its progress per the mode; the result also takes
    ``set_postfix(**values)`` (shown on the bar or the line)."""
    from utils.runtime.dist import is_main

    mode = _mode if _mode != "auto" else "bars" if _watched() else "lines"
    if not is_main():  # rank 0 reports for all
        mode = "off"
    if mode == "bars":  # a finished bar is erased: the line after it says what it did
        return tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=False)
    return _Lines(iterable, desc, every=LINE_INTERVAL_S if mode == "lines" else None)


class _Lines:
    """An iterable that prints ``desc: i/n (p%), rate, postfix`` every ``every`` seconds
    (never with ``every=None``)."""

    def __init__(self, iterable: Iterable, desc: str, every: Optional[float]) -> None:
        self.iterable, self.desc, self.every, self.postfix = iterable, desc, every, {}

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
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


# The output is updated at most this often, whatever is printed.
REDRAW_INTERVAL_S = 0.5
# The output keeps the last lines only; metrics.jsonl holds every epoch.
MAX_LINES = 400
# Longer lines are folded at their clause separators, not wherever the page wraps them (or
# scrolls, where it does not wrap); an epoch's line is written to fit (the brief form of
# utils.reports.text.epoch_line). 115: what JupyterLab shows beside its file browser at 1366 px.
NOTEBOOK_COLUMNS = 115
_SEPARATOR = re.compile(r"(?<=\S)(?= \| )|(?<=; )(?=\S)")
_INDENT = "   "


def fold(line: str, width: int = NOTEBOOK_COLUMNS) -> list[str]:
    """``line`` as lines of at most ``width`` characters, broken before `` | `` and after
    ``; `` (the clauses of the epoch and stage lines), else between words; continued with an
    indent."""
    if len(line) <= width:
        return [line]
    folded = [""]
    for piece in _SEPARATOR.split(line):
        if folded[-1].strip() and len(folded[-1]) + len(piece) > width:
            folded.append(_INDENT + piece.lstrip())
        else:
            folded[-1] += piece
    return [short for part in folded for short in textwrap.wrap(
        part.rstrip(), width, subsequent_indent=_INDENT, break_long_words=False) or [part]]


@contextlib.contextmanager
def one_output() -> Iterator[None]:
    """In a notebook, what the block prints (lines, bars, warnings) is one output updated in
    place, bars redrawn where they stand; elsewhere nothing changes."""
    if not in_notebook() or isinstance(sys.stdout, _OneOutput):
        yield
        return
    from IPython.display import display

    handle = display({"text/plain": ""}, raw=True, display_id=True)
    saved, sys.stdout = (sys.stdout, sys.stderr), _OneOutput(handle)
    sys.stderr = sys.stdout
    try:
        yield
    finally:
        sys.stdout.show()
        sys.stdout, sys.stderr = saved


class _OneOutput(io.TextIOBase):
    """A text stream shown as one notebook output: a carriage return starts its line again
    (a bar's redraw), a newline ends it."""

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self.handle, self.lines, self.shown_at, self.dropped = handle, [""], 0.0, 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        for piece in re.split(r"(\r\n|\r|\n)", text):
            if piece in ("\n", "\r\n"):  # a Windows line ending ends the line too
                self.lines.append("")
            elif piece == "\r":
                self.lines[-1] = ""
            else:
                self.lines[-1] += piece
        if len(self.lines) > MAX_LINES:
            self.dropped += len(self.lines) - MAX_LINES
            del self.lines[:-MAX_LINES]
        # At most one update per interval, whatever is printed (each sends every line kept);
        # what is held back shows with the next write after it, or at the block's end.
        if time.monotonic() - self.shown_at >= REDRAW_INTERVAL_S:
            self.show()
        return len(text)

    def show(self) -> None:
        """Update the output with the text so far, long lines folded (:func:`fold`)."""
        head = [f"... ({self.dropped} earlier lines)"] if self.dropped else []
        lines = [part for line in self.lines for part in fold(line)]
        self.handle.update({"text/plain": "\n".join(head + lines).rstrip("\n")}, raw=True)
        self.shown_at = time.monotonic()
