"""Training steps and one evaluation pass, the same on CPU, one GPU or N ranks.

:func:`train_steps` yields after each optimizer update (:func:`training.grads.apply_update`)
to the epoch loop (:mod:`training.epoch`), which knows the run; :func:`evaluate` measures
a model on a loader. Nothing here knows the run.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np
import paddle

from losses.rdrop import log_softmax, nll
from models.frozen import train_mode
from training.amp import Precision
from training.grads import apply_update, trainable
from utils.reports.progress import track
from utils.runtime.dist import all_min, all_sum, any_rank, rank, world_size
from utils.runtime.seeds import derived_seed

if TYPE_CHECKING:
    from training.stage import Stage
    from training.state import EpochProgress
    from utils.runtime.signals import StopRequests

# With several ranks, how often an evaluation pass asks whether any rank was asked to stop:
# a stop then waits for at most this many batches, not the whole pass.
STOP_AGREEMENT_BATCHES = 4


def train_step(stage: Stage, images: paddle.Tensor, labels: paddle.Tensor,
               loss_scale: float = 1.0) -> dict:
    """Forward and backward of one (micro-)batch; returns the unscaled loss parts.

    With R-Drop (``criterion.copies == 2``) the batch is doubled as ``[x; x]`` and
    passed once: both copies see independent dropout masks at the same rate, at
    the cost of one forward over 2B images instead of two separate passes.
    ``loss_scale`` (1/accum_steps) makes accumulated gradients equal those of
    one batch holding all the micro-batches. The stage's precision runs the forward
    under AMP and scales the loss for fp16; the loss itself is computed in float32. A
    distillation teacher (frozen, eval mode) sees the same preprocessed images, once,
    without gradients; the criterion gets its logits.
    """
    precision, teacher, criterion = stage.precision, stage.teacher, stage.criterion
    x = stage.preprocess(images)
    targets = {}
    if teacher is not None:
        with paddle.no_grad(), precision.autocast():
            targets["teacher_logits"] = teacher(x)
    if criterion.copies == 2:
        x = paddle.concat([x, x])
    with precision.autocast():
        logits = stage.model(x)
    parts = criterion(logits, labels, **targets)
    precision.scaled(parts["loss"] * loss_scale).backward()
    return parts


class Step(NamedTuple):
    """One optimizer step as :func:`train_steps` reports it: the loss parts of its last
    micro-batch with ``lr`` and ``grad_norm`` (``None`` when not measured), and whether it
    was ``"applied"``, skipped for an fp16 ``"overflow"``, or ``"nonfinite"``."""

    values: dict
    status: str


def train_steps(stage: Stage, batches: Iterable, progress: EpochProgress,
                dropout_seed: Optional[tuple] = None, desc: str = "train") -> Iterator[Step]:
    """Train ``stage`` over ``batches`` (those not yet done in ``progress``, which holds the
    epoch so far), yielding a :class:`Step` after each optimizer step.

    Gradients of ``stage.accum_steps`` micro-batches are summed before each optimizer
    step (under DataParallel, ranks exchange gradients only on the last of them),
    then clipped to the global norm ``stage.clip_norm`` (:func:`training.grads.apply_update`).
    A step is ``"applied"``, or not applied and leaves the weights, the optimizer and
    the LR schedule as they were: under fp16 loss scaling a micro-batch's loss (on any
    rank) or a gradient that is not finite is an ``"overflow"`` (the loss scaler then
    lowers its scale), without it, or when it persists at the minimum scale, it is
    ``"nonfinite"`` (``train.nan_policy`` decides).
    ``dropout_seed`` (keys such as ``(seed, epoch)``) seeds the dropout masks of each
    micro-batch from those keys and its index, so that a resumed epoch draws the masks
    the uninterrupted one drew; ranks add their own key and draw different masks.
    The frozen parameters' layers run per ``stage.frozen_eval``
    (:func:`models.frozen.train_mode`).
    """
    model, optimizer, scheduler = stage.model, stage.optimizer, stage.scheduler
    precision, accum_steps = stage.precision, stage.accum_steps
    train_mode(model, stage.frozen_eval)
    params = trainable(model)
    rank_key = (rank(),) if world_size() > 1 else ()  # one process keeps the keys it had
    start = time.perf_counter() - progress.elapsed
    bar = track(batches, desc)
    nonfinite = False
    for images, labels in bar:
        if dropout_seed is not None:
            paddle.seed(derived_seed(*dropout_seed, progress.micro, *rank_key))
        last_micro = (progress.micro + 1) % accum_steps == 0
        with (contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync")
              else model.no_sync()):
            parts = train_step(stage, images, labels, 1.0 / accum_steps)
        values = {name: float(value) for name, value in parts.items()}
        batch = labels.shape[0]
        progress.seen += batch
        if all(math.isfinite(value) for value in values.values()):
            for name, value in values.items():
                progress.sums[name] = progress.sums.get(name, 0.0) + value * batch
        else:
            nonfinite = True
            progress.excluded += batch
        progress.micro += 1
        if progress.micro % accum_steps:
            continue
        lr = optimizer.get_lr()
        if any_rank(nonfinite):  # under fp16 loss scaling an overflow of the forward pass
            grad_norm = None
            status = "overflow" if precision.scaler.update(False) else "nonfinite"
        else:
            grad_norm, status = apply_update(optimizer, params, precision, stage.clip_norm)
        optimizer.clear_grad()
        if status == "applied":
            progress.add_step(grad_norm)
            if scheduler is not None:
                scheduler.step()
        elif status == "overflow":
            progress.overflow_steps += 1
        progress.elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        extra = {"loss_scale": precision.scaler.scale} if precision.scaling else {}
        yield Step(dict(values, lr=lr, grad_norm=grad_norm, **extra), status)
        nonfinite = False
    progress.elapsed = time.perf_counter() - start


@paddle.no_grad()
def evaluate(model: paddle.nn.Layer, preprocess: Callable, loader: Iterable, num_classes: int,
             desc: str = "eval", stops: Optional[StopRequests] = None,
             precision: Optional[Precision] = None) -> dict:
    """Top-1, top-5 and cross-entropy averaged per sample, plus per-class top-1.

    Every sample counts once, whatever the batch sizes (the last batch included).
    With several ranks each evaluates its shard and the counts are summed, so the
    result is that of one process. With ``stops`` (a :class:`utils.runtime.signals.StopRequests`)
    a stop request abandons the pass: the result is then ``None``; ranks agree on it every
    :data:`STOP_AGREEMENT_BATCHES` batches (a pass over a validation set could outlast the
    launcher's grace between its SIGTERM and its SIGKILL). The loader's batches are
    clean (unreadable images skipped under ``data.skip_bad_images`` are not in them).
    """
    precision = precision or Precision()
    # Batches every rank has (shards differ by at most one image): agreement only there.
    agreed = all_min(len(loader)) if stops is not None and world_size() > 1 else None
    model.eval()
    topk = min(5, num_classes)
    correct1 = correct5 = 0
    loss_sum = 0.0
    class_correct = np.zeros(num_classes, dtype=np.int64)
    class_total = np.zeros(num_classes, dtype=np.int64)
    for index, (images, labels) in enumerate(track(loader, desc)):
        if stops is not None and (stops.requested if agreed is None else
                                  index < agreed and index % STOP_AGREEMENT_BATCHES == 0
                                  and any_rank(stops.requested)):
            return None
        with precision.autocast():
            logits = model(preprocess(images))
        logits = logits.astype("float32")
        labels = labels.reshape([-1]).astype("int64")
        batch = labels.shape[0]
        loss_sum += float(nll(log_softmax(logits), labels)) * batch
        top = paddle.topk(logits, k=topk, axis=-1)[1].numpy()
        truth = labels.numpy()
        hit1 = top[:, 0] == truth
        correct1 += int(hit1.sum())
        correct5 += int((top == truth[:, None]).any(axis=1).sum())
        class_total += np.bincount(truth, minlength=num_classes)
        class_correct += np.bincount(truth[hit1], minlength=num_classes)
    sums = all_sum(np.concatenate([[correct1, correct5, loss_sum], class_correct, class_total]))
    correct1, correct5, loss_sum = int(sums[0]), int(sums[1]), float(sums[2])
    class_correct, class_total = sums[3:3 + num_classes], sums[3 + num_classes:]
    total = int(class_total.sum())
    per_class = np.where(class_total > 0, class_correct / np.maximum(class_total, 1), np.nan)
    return {
        "top1": correct1 / max(total, 1),
        # Among at most five classes every label is in the top five: no measure, no number.
        "top5": correct5 / max(total, 1) if num_classes > 5 else None,
        "loss": loss_sum / max(total, 1),
        "num_samples": total,
        "per_class_top1": [None if np.isnan(v) else float(v) for v in per_class],
    }
