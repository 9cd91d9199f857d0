"""One code path for one process and for N ranks started by ``paddle.distributed.launch``.

Without the launcher the world has one rank and every helper here is a no-op, so the
single-process run pays nothing and takes no other branch of the training loop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

import numpy as np
import paddle
import paddle.distributed as dist


def world_size() -> int:
    """Ranks in the job (1 without the launcher)."""
    return dist.get_world_size()


def rank() -> int:
    """This process's rank (0 without the launcher)."""
    return dist.get_rank()


def is_main() -> bool:
    """Whether this rank writes checkpoints, logs and reports."""
    return rank() == 0


def launcher_arguments(script: str) -> list[str]:
    """What comes between the interpreter and ``script`` on the command line that started
    this job: nothing, or under ``paddle.distributed.launch`` the launcher's module and
    options (read from its command line on Linux; its rank count elsewhere)."""
    if world_size() == 1:
        return []
    launcher = launcher_process()
    if launcher is not None:
        command = _command_line(launcher[0])
        end = next((i for i, arg in enumerate(command) if os.path.basename(arg) == script),
                   None)
        if end is not None:
            return command[1:end]
    return ["-m", "paddle.distributed.launch", "--nproc_per_node", str(world_size())]


def _command_line(pid):
    """The arguments process ``pid`` was started with (Linux); empty when unknown."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [arg.decode(errors="replace") for arg in handle.read().split(b"\0") if arg]
    except OSError:
        return []


def _stat(pid):
    """(parent pid, state, start time) of process ``pid`` from /proc (Linux), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (Linux: exists and is not a zombie)."""
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"


def launcher_process() -> Optional[tuple[int, int]]:
    """(pid, start time) of the ``paddle.distributed.launch`` process this rank descends
    from, directly or through a wrapper script; ``None`` without one (or off Linux)."""
    pid = os.getppid()
    while pid > 1:
        stat = _stat(pid)
        if stat is None:
            return None
        if "paddle.distributed.launch" in _command_line(pid):
            return pid, stat[2]
        pid = stat[0]
    return None


PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def die_with_parent(parent: int, signum: int = signal.SIGKILL) -> None:
    """Have the kernel send ``signum`` to this process when its parent (pid ``parent``) dies
    (Linux). Loader workers are killed with their rank; a launched rank gets SIGTERM, a stop
    request that saves a checkpoint: the launcher starts each rank in a session of its own,
    so a launcher killed with kill -9, or by SIGHUP when its terminal closes, tells its ranks
    nothing, and a wrapper script between the launcher and the rank dies the same way."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _stop_when_gone(launcher: Optional[tuple[int, int]], every: float = 0.5) -> None:
    """Send this process SIGTERM (a stop request that saves) once ``launcher`` (pid, start
    time) has ended, when it is not this rank's parent: the kernel's parent-death signal
    follows the parent only, and a wrapper script between the two can outlive a launcher
    ended by SIGHUP."""
    if launcher is None or launcher[0] == os.getppid():
        return

    def watch() -> None:
        while True:
            time.sleep(every)
            stat = _stat(launcher[0])
            if stat is None or stat[1] == "Z" or stat[2] != launcher[1]:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def init() -> None:
    """Join the process group when started by the launcher (NCCL on GPUs, gloo on CPUs).

    Only rank 0 reports: the other ranks' standard output is dropped (every line would be
    the same), their standard error, where errors go, is kept."""
    if world_size() > 1:
        die_with_parent(os.getppid(), signal.SIGTERM)
        _stop_when_gone(launcher_process())
        dist.init_parallel_env()
        if not is_main():
            sys.stdout = open(os.devnull, "w", encoding="utf-8")


def wrap(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """``paddle.DataParallel(model)`` (gradients averaged over ranks in backward) with
    several ranks; the model itself with one."""
    return paddle.DataParallel(model) if world_size() > 1 else model


def all_sum(values: Sequence[float]) -> np.ndarray:
    """Element-wise sum of a float array over ranks (float64, so counts stay exact)."""
    values = np.asarray(values, dtype=np.float64)
    if world_size() == 1:
        return values
    tensor = paddle.to_tensor(values)
    dist.all_reduce(tensor)
    return tensor.numpy()


def all_min(value: int) -> int:
    """The smallest of an integer over ranks."""
    if world_size() == 1:
        return value
    tensor = paddle.to_tensor([value], dtype="int64")
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.numpy()[0])


def any_rank(flag: Any) -> bool:
    """True when ``flag`` is true on any rank: a decision every rank then takes together."""
    return bool(all_sum([float(bool(flag))])[0] > 0) if world_size() > 1 else bool(flag)
