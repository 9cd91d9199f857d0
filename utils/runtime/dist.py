"""One code path for one process and for N ranks started by ``paddle.distributed.launch``.

Without the launcher the world has one rank and every helper here is a no-op, so the
single-process run pays nothing and takes no other branch of the training loop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any, Sequence

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


def launcher_prefix(script: str) -> list[str]:
    """What comes before ``script`` on the command line that started this job: ``python``,
    or under ``paddle.distributed.launch`` its own command with its options (read from the
    launcher's command line on Linux; its rank count elsewhere)."""
    if world_size() == 1:
        return ["python"]
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            parent = [arg.decode(errors="replace") for arg in handle.read().split(b"\0") if arg]
        end = next(i for i, arg in enumerate(parent) if os.path.basename(arg) == script)
        if "paddle.distributed.launch" in parent[:end]:
            return ["python", *parent[1:end]]
    except (OSError, StopIteration):
        pass
    return ["python", "-m", "paddle.distributed.launch", "--nproc_per_node", str(world_size())]


PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent (pid ``parent``) dies (Linux).
    Loader workers and launched ranks call it: the launcher starts each rank in a session
    of its own, and without it the ranks of a launcher killed with kill -9 trained on for
    seconds, writing epochs and holding the run folder against the ``--resume`` that
    followed."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def init() -> None:
    """Join the process group when started by the launcher (NCCL on GPUs, gloo on CPUs).

    Only rank 0 reports: the other ranks' standard output is dropped (every line would be
    the same), their standard error, where errors go, is kept."""
    if world_size() > 1:
        die_with_parent(os.getppid())
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


def any_rank(flag: Any) -> bool:
    """True when ``flag`` is true on any rank: a decision every rank then takes together."""
    return bool(all_sum([float(bool(flag))])[0] > 0) if world_size() > 1 else bool(flag)
