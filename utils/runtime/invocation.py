"""The command that continues a run, as it was started: pasted into any terminal, from any
folder, it runs the same way again.

It names the interpreter that trained (``sys.executable``: in a new terminal ``python`` may be
another one, or a virtual environment not activated), the entry script by its absolute path,
the folder it started in (the options' relative paths are relative to it) and the options as
given, with ``--resume``. Under ``paddle.distributed.launch`` it is the launcher's command.
When the started process wrote to a file, the same redirection follows, and a run started
with ``nohup`` or in the background (``&``) is continued the same way.
"""

from __future__ import annotations

import os
import platform
import shlex
import signal
import stat
import sys
from typing import Optional, Sequence

# Read at import, before the entry point installs its own handlers: ``nohup`` starts a
# process with SIGHUP ignored.
_NOHUP_AT_START = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resume_command(script: str, arguments: Sequence[str], keep_output: bool = True) -> str:
    """The shell command that runs ``script`` (a file of the project, e.g. ``main.py``) with
    ``arguments`` plus ``--resume``, as this process was started: through the launcher for a
    launched rank; with ``keep_output`` the started process's output redirection and
    background form (a notebook passes ``False``: its kernel's output is not the run's)."""
    from utils.runtime.dist import launcher_arguments, launcher_process

    arguments = list(arguments)
    if not any(arg == "--resume" or arg.startswith("--resume=") for arg in arguments):
        arguments.append("--resume")
    launched = launcher_arguments(script)
    launcher = launcher_process() if launched else None
    command = [sys.executable, *launched, os.path.join(PROJECT, script), *arguments]
    where = f"cd {shlex.quote(os.getcwd())} && "
    if not keep_output:
        return where + shlex.join(command)
    pid = launcher[0] if launcher is not None else os.getpid()
    nohup = _ignores_sighup(pid) if launcher is not None else _NOHUP_AT_START
    background = nohup or _in_background(pid)
    return (where + ("nohup " if nohup else "") + shlex.join(command) + _redirection(pid)
            + (" &" if background else ""))


def environment_line() -> str:
    """A comment that says which environment the command runs in."""
    from utils.runtime.device import paddle_version

    version = ".".join(map(str, paddle_version()))
    return (f"# runs from any terminal: it names the interpreter that trained ({sys.executable}, "
            f"Python {platform.python_version()}, Paddle {version}, environment {sys.prefix})")


def _redirection(pid: int) -> str:
    """`` >> FILE`` (and ``2>&1`` or ``2>> FILE``) when process ``pid`` writes its standard
    output (error) to a regular file (Linux); empty otherwise."""
    out, err = _regular_file(pid, 1), _regular_file(pid, 2)
    if out is None:
        return f" 2>> {shlex.quote(err[0])}" if err is not None else ""
    text = f" >> {shlex.quote(out[0])}"
    if err is not None:
        text += " 2>&1" if err[1] == out[1] else f" 2>> {shlex.quote(err[0])}"
    return text


def _regular_file(pid: int, fd: int) -> Optional[tuple[str, tuple[int, int]]]:
    """(path, (device, inode)) of descriptor ``fd`` of process ``pid`` when it is a regular
    file that still has its name."""
    link = f"/proc/{pid}/fd/{fd}"
    try:
        status, path = os.stat(link), os.readlink(link)
    except OSError:
        return None
    if not stat.S_ISREG(status.st_mode) or not os.path.isabs(path) or \
            path.endswith(" (deleted)"):
        return None
    return path, (status.st_dev, status.st_ino)


def _ignores_sighup(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGHUP (started by ``nohup``; Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            mask = next(line.split()[1] for line in handle if line.startswith("SigIgn:"))
        return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))
    except (OSError, StopIteration, ValueError, IndexError):
        return False


def _in_background(pid: int) -> bool:
    """Whether process ``pid`` has a terminal whose foreground is another process group
    (started with ``&``; Linux)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        group, terminal, foreground = int(fields[2]), int(fields[4]), int(fields[5])
    except (OSError, IndexError, ValueError):
        return False
    return terminal != 0 and foreground != group
