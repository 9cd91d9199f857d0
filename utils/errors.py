"""Exceptions the command-line entry points turn into one line instead of a traceback."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional


class NotebookTerms:
    """How an error reads in a notebook: plain, until the notebook's helpers
    (:mod:`planning.notebook`) install their wording of command-line advice."""

    advice: Callable[[str], str] = staticmethod(lambda message: message)
    resume: str = "resume it with --resume"
    stop: str = "Ctrl-C"  # how a person stops a run in progress


class UserError(Exception):
    """An expected failure: bad config, missing or damaged file, no network, divergence.

    The command-line entry points print its message as a single ``error:`` line
    and exit non-zero, without a traceback (``--debug`` shows it).
    """

    def _render_traceback_(self) -> list[str]:
        """IPython's hook: in a notebook the error is one line too (the cell still fails,
        so "Run All" stops), its advice in the notebook's parameters."""
        return [f"error: {NotebookTerms.advice(str(self))}"]


class Interrupted(Exception):
    """A run stopped on SIGINT/SIGTERM after saving its checkpoint.

    The entry point prints the message (where the checkpoint is, how to resume) and
    exits with ``128 + signal number``, as a shell does for a killed process.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

    def _render_traceback_(self) -> list[str]:
        """IPython's hook: in a notebook, one line that says how to continue there."""
        return [f"interrupted: {self}; to continue {NotebookTerms.resume}"]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device (or host) running out of memory, however Paddle says it
    (``MemoryError``, ``ResourceExhaustedError``, "Out of memory" in a ``RuntimeError``)."""
    if isinstance(exc, UserError):  # already says what happened and what to do
        return False
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, MemoryError) or "resourceexhausted" in text \
        or "out of memory" in text


def out_of_memory_error(where: str, last_checkpoint: Optional[str], accum_steps: int) -> UserError:
    """The :class:`UserError` of a run that ran out of memory at ``where``: the last
    checkpoint is safe, and how to find a micro-batch that fits."""
    return UserError(f"out of memory at {where}; the last checkpoint "
                     f"({last_checkpoint or 'none yet'}) is safe. Find a micro-batch that fits "
                     f"with python main.py ... --preflight, then raise train.accum_steps (now "
                     f"{accum_steps}) or set model.recompute=true")


@contextlib.contextmanager
def optional_output(what: str) -> Iterator[None]:
    """Around an output that decorates a result (a chart, a font for it): whatever fails in
    it is one ``warning:`` line, and the command's result and exit code stand."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - decoration only: nothing it raises ends a run
        detail = " ".join(str(exc).split()) or type(exc).__name__
        print(f"warning: {what} skipped ({detail})", flush=True)
