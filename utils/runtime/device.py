"""The device a process runs on: the GPU when Paddle is built with CUDA and sees one, the
CPU otherwise; and the peak memory it used."""

import resource

from utils.runtime.signals import reassert_handlers


def select_device() -> str:
    """Use the GPU when Paddle is built with CUDA and sees one, the CPU otherwise; return its name."""
    import paddle

    reassert_handlers()

    paddle.set_device("gpu" if gpu_visible() else "cpu")
    return paddle.get_device()


def peak_memory_bytes(device: str) -> int:
    """The process's peak memory so far: Paddle's max allocated on a GPU, the peak resident
    set on a CPU."""
    import paddle

    if str(device).startswith("gpu"):
        return int(paddle.device.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def gpu_visible() -> bool:
    """Whether this Paddle is built with CUDA and sees a GPU."""
    import paddle

    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
