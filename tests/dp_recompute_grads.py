"""Gradients of one R-Drop step of the tiny model on the ranks of ``paddle.distributed.launch``,
with and without activation recompute, one or two micro-batches (the first under
``no_sync``), without and with dropout: rank 0 saves each case's all-reduced gradients to
``OUT/<case>.npz``. Run by tests/test_scaling.py; the 8 images are split over the ranks."""

import contextlib
import os
import sys

import numpy as np
import paddle

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_model_config  # noqa: E402

from losses import RDropLoss  # noqa: E402
from models.build import build_model  # noqa: E402
from training.engine import train_step  # noqa: E402
from training.stage import Stage  # noqa: E402
from utils.runtime.dist import init, is_main, rank, world_size, wrap  # noqa: E402

IMAGES = 8


def batch():
    """The 8 images and labels every process (and the test) uses."""
    rng = np.random.default_rng(1)
    return (rng.integers(0, 256, (IMAGES, 32, 32, 3)).astype("uint8"),
            rng.integers(0, 10, IMAGES).astype("int64"))


def gradients(recompute, accum, drop):
    """This rank's share of the batch in ``accum`` micro-batches; the wrapped model's
    gradients by parameter path."""
    paddle.seed(0)
    model = build_model(tiny_model_config(drop_rate=drop, attn_drop_rate=drop,
                                          drop_path_rate=drop, recompute=recompute))
    trained = wrap(model)
    trained.train()
    images, labels = batch()
    share = IMAGES // world_size()
    micro = share // accum
    for index in range(accum):
        start = rank() * share + index * micro
        paddle.seed(100 + 10 * rank() + index)  # the dropout masks of this micro-batch
        last = index == accum - 1
        with contextlib.nullcontext() if last or world_size() == 1 else trained.no_sync():
            train_step(Stage.of_parts(trained, RDropLoss(alpha=1.0)),
                       paddle.to_tensor(images[start:start + micro]),
                       paddle.to_tensor(labels[start:start + micro]), 1.0 / accum)
    return {path: param.grad.numpy() for path, param in model.named_parameters()}


def main(out):
    init()
    for recompute in (False, True):
        for accum in (1, 2):
            for drop in (0.0, 0.3):
                grads = gradients(recompute, accum, drop)
                if is_main():
                    np.savez(os.path.join(out, f"rc{int(recompute)}_acc{accum}_drop{drop}.npz"),
                             **grads)


if __name__ == "__main__":
    main(sys.argv[1])
