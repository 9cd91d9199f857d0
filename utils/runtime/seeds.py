"""Seeds: the run's seed for every generator, and seeds derived from it for each stream."""

import random

import numpy as np


def seed_everything(seed):
    """Seed Paddle (weights, dropout), NumPy and Python's ``random``."""
    import paddle

    paddle.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(*keys):
    """A 32-bit seed derived from integers (seed, epoch, step, ...), stable across runs."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])
