"""Seeds: the run's seed for every generator, and seeds derived from it for each stream."""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Paddle (weights, dropout), NumPy and Python's ``random``."""
    import paddle

    paddle.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(*keys: int) -> int:
    """A 32-bit seed derived from integers (seed, epoch, step, ...), stable across runs."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run a block without moving any random stream: Paddle's (the CPU's and the current
    device's), NumPy's and Python's states are put back after it."""
    import paddle
    from paddle.framework import core

    # The CPU generator directly: Paddle 2.6's set_rng_state(..., device="cpu") fails.
    cpu = core.default_cpu_generator()
    cpu_state = cpu.get_state()
    device = None if paddle.get_device().startswith("cpu") else paddle.get_rng_state()
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        cpu.set_state(cpu_state)
        if device is not None:
            paddle.set_rng_state(device)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
