"""The device a process runs on: the GPU when Paddle is built with CUDA and sees one, the
CPU otherwise; and the peak memory it used (the process's, and Paddle's allocator's since
a reset)."""

import os
import re
import resource
from typing import Optional

from utils.errors import UserError
from utils.runtime.signals import reassert_handlers

# Paddle's flags for deterministic GPU kernels (train.deterministic): cuDNN's algorithm choice
# and flash attention's backward pass in one split (FLAGS_cudnn_deterministic), and embedding
# gradients. Paddle reads them from the environment when it is imported.
DETERMINISTIC_FLAGS = {"FLAGS_cudnn_deterministic": True, "FLAGS_embedding_deterministic": 1}


def paddle_version(text: Optional[str] = None) -> tuple[int, int, int]:
    """``paddle.__version__`` (or ``text``) as (major, minor, patch): ``3.0.0rc1`` → (3, 0, 0);
    a source build's ``0.0.0`` counts as newer than every release."""
    if text is None:
        import paddle

        text = paddle.__version__
    parts = [int(re.match(r"\d*", part).group() or 0) for part in (text.split(".") + ["0"] * 3)[:3]]
    return (999, 0, 0) if parts == [0, 0, 0] else (parts[0], parts[1], parts[2])


def select_device(deterministic: bool = False) -> str:
    """Use the GPU when Paddle is built with CUDA and sees one, the CPU otherwise; return its
    name. With ``deterministic`` (``train.deterministic``), ask for deterministic kernels."""
    import paddle

    reassert_handlers()

    paddle.set_device("gpu" if gpu_visible() else "cpu")
    if deterministic:
        _deterministic_kernels()
    return paddle.get_device()


def deterministic_environment() -> None:
    """Put :data:`DETERMINISTIC_FLAGS` in the environment, for a Paddle imported after this."""
    os.environ.update({name: str(int(value)) for name, value in DETERMINISTIC_FLAGS.items()})


def _deterministic_kernels():
    """Set :data:`DETERMINISTIC_FLAGS` through ``paddle.set_flags``. A CPU build has no such
    flags (its kernels are deterministic); a GPU build that refuses them must have read them
    from the environment."""
    import paddle

    try:
        paddle.set_flags(DETERMINISTIC_FLAGS)
    except ValueError:
        if gpu_visible() and any(os.environ.get(name) != str(int(value))
                                 for name, value in DETERMINISTIC_FLAGS.items()):
            raise UserError("train.deterministic: this Paddle takes FLAGS_cudnn_deterministic "
                            "only from the environment; start the run with "
                            "FLAGS_cudnn_deterministic=1 FLAGS_embedding_deterministic=1 "
                            "in front of the command") from None


def matmul_flop_rate(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of this device on a float32 ``size``² matrix product, the best of ``repeats``
    (a fraction of a second; an upper bound on what training reaches)."""
    import time

    import paddle

    a = paddle.rand([size, size])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(paddle.matmul(a, a)[0, 0])  # waits for the result
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_memory_bytes(device: str) -> int:
    """The process's peak memory so far: Paddle's max allocated on a GPU, the peak resident
    set on a CPU."""
    import paddle

    if str(device).startswith("gpu"):
        return int(paddle.device.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_memory(device: str) -> None:
    """Start the peaks of :func:`allocator_peaks` afresh where this Paddle can (Paddle 3;
    2.6 has no reset and keeps the peak since the process started)."""
    from paddle.base import core

    if str(device).startswith("gpu"):
        reset, kinds, index = (getattr(core, "device_memory_stat_reset_peak_value", None),
                               ("Allocated", "Reserved"), _gpu_index(device))
    else:
        reset, kinds, index = getattr(core, "host_memory_stat_reset_peak_value", None), \
            ("Allocated",), 0
    for kind in kinds if reset else ():
        reset(kind, index)


def peaks_reset() -> bool:
    """Whether :func:`reset_peak_memory` can reset this Paddle's peaks (not on Paddle 2.6)."""
    from paddle.base import core

    return hasattr(core, "host_memory_stat_reset_peak_value")


def allocator_peaks(device: str) -> dict:
    """The peaks of Paddle's allocator since :func:`reset_peak_memory`: ``allocated`` (the
    tensors) and, on a GPU, ``reserved`` (what the allocator holds from the driver: what
    nvidia-smi shows, less the CUDA context; ``None`` on a CPU)."""
    from paddle.base import core

    if str(device).startswith("gpu"):
        index = _gpu_index(device)
        return {"allocated": int(core.device_memory_stat_peak_value("Allocated", index)),
                "reserved": int(core.device_memory_stat_peak_value("Reserved", index))}
    return {"allocated": int(core.host_memory_stat_peak_value("Allocated", 0)), "reserved": None}


def allocated_bytes(device: str) -> int:
    """What Paddle's allocator holds in tensors now."""
    from paddle.base import core

    if str(device).startswith("gpu"):
        return int(core.device_memory_stat_current_value("Allocated", _gpu_index(device)))
    return int(core.host_memory_stat_current_value("Allocated", 0))


class PeakMemory:
    """Paddle's allocator peaks over a span of work that restarts the peak inside it (to
    measure one part): :meth:`restart` begins a part and returns what is allocated then,
    :meth:`since_restart` is the part's peak (``None`` where this Paddle cannot reset
    it: 2.6), :meth:`overall` the peaks of the whole span."""

    def __init__(self, device: str) -> None:
        self.device = device
        reset_peak_memory(device)
        self.peaks = allocator_peaks(device)

    def _fold(self) -> None:
        now = allocator_peaks(self.device)
        self.peaks = {kind: None if value is None else max(value, self.peaks[kind] or 0)
                      for kind, value in now.items()}

    def restart(self) -> int:
        """Begin a part; the bytes allocated as it begins."""
        self._fold()
        reset_peak_memory(self.device)
        return allocated_bytes(self.device)

    def since_restart(self) -> Optional[int]:
        """The allocated peak since :meth:`restart`."""
        return allocator_peaks(self.device)["allocated"] if peaks_reset() else None

    def overall(self) -> dict:
        """:func:`allocator_peaks` over the whole span."""
        self._fold()
        return self.peaks


def _gpu_index(device):
    return int(str(device).split(":")[1]) if ":" in str(device) else 0


def gpu_visible() -> bool:
    """Whether this Paddle is built with CUDA and sees a GPU."""
    import paddle

    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def capability_of(device: str) -> Optional[int]:
    """The compute capability (major) of ``device``; ``None`` for a CPU."""
    if not str(device).startswith("gpu"):
        return None
    import paddle

    return paddle.device.cuda.get_device_capability()[0]
