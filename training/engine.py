"""One epoch of a stage and one evaluation pass, the same on CPU, one GPU or N ranks.

:func:`train_one_epoch` iterates :func:`train_steps`, which yields after each optimizer
update (:func:`training.grads.apply_update`); :func:`validate` evaluates the raw weights
and each average with :func:`evaluate`.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np
import paddle

from data.loader import set_epoch
from losses.rdrop import log_softmax, nll
from training.amp import Precision
from training.averaging import weights_in
from training.grads import apply_update, trainable
from training.state import EpochProgress, Position
from utils.errors import UserError
from utils.reports.progress import track
from utils.reports.text import place
from utils.runtime.dist import all_min, all_sum, any_rank, rank, world_size
from utils.runtime.seeds import derived_seed

if TYPE_CHECKING:
    from training.run import Run, Segment
    from training.stage import Stage
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


def train_mode(model: paddle.nn.Layer, frozen_eval: bool = True) -> paddle.nn.Layer:
    """``model.train()``, then, with ``frozen_eval``, the frozen part back in eval mode (no
    dropout, attention dropout or drop path), as at test time: every layer whose parameters
    are all frozen, and every layer without parameters (a dropout) that feeds one. A FixRes
    stage thus fits its trained part on the features evaluation will give it."""
    model.train()
    if frozen_eval:
        _frozen_to_eval(model)
    return model


def _frozen_to_eval(layer: paddle.nn.Layer) -> None:
    children = [child for _, child in layer.named_children()]
    params = [list(child.parameters()) for child in children]
    trains = [any(not p.stop_gradient for p in group) for group in params]
    for i, child in enumerate(children):
        if params[i]:
            if trains[i]:
                _frozen_to_eval(child)
            else:
                child.eval()
            continue
        following = next((j for j in range(i + 1, len(children)) if params[j]), None)
        if following is not None and not trains[following]:
            child.eval()  # a parameterless layer (dropout) in front of a frozen one


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
    (:func:`train_mode`).
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


def train_one_epoch(stage: Stage, run: Run, segment: Segment) -> None:
    """Train ``stage`` through the ``segment`` of an epoch (its whole window, or up to the
    next validation with ``train.eval_every_steps``). After each optimizer step: the step
    log, the EMA, a checkpoint when one is due, and the end of the run when a stop was
    requested; at the epoch's end the SWA. Only applied updates count as steps: a skipped
    one (a non-finite loss under ``nan_policy: skip``, an fp16 overflow) moves neither the
    schedule nor the averages."""
    here, progress, train = segment.here, segment.progress, run.cfg.train
    loader = stage.train_loader
    set_epoch(loader, run.state.epoch_index, start=progress.micro)
    loader.batch_sampler.stop = stage.length.window(here.epoch)
    desc = place(here.stage, here.epoch + 1, stage.length.epochs)
    for step in train_steps(stage, loader, progress, (train.seed, run.state.epoch_index), desc):
        if step.status == "nonfinite":  # stop, or skip (train.nan_policy)
            run.skip_nonfinite(step.values, here, progress.micro // stage.accum_steps)
        if step.status == "applied":
            run.log_step(step.values, stage.optimizer)
        validate_now = stage.length.eval_due(here.epoch, progress.micro, train.eval_every_steps)
        stop = run.stop_requested()
        if stop or (step.status == "applied" and run.step_checkpoint_due()
                    and progress.micro < loader.batch_sampler.stop):
            run.checkpoint(Position(here.stage, here.epoch, progress.micro,
                                    evaluating=validate_now), progress.summed())
        if stop:
            raise run.interrupted(here)
        if validate_now:
            break  # validate now; the epoch goes on from here afterwards
    if stage.length.ends_epoch(here.epoch, progress.micro):
        run.update_swa(here, stage.optimizer)


def validate(stage: Stage, run: Run, segment: Segment) -> Optional[dict]:
    """The validation results of the raw weights and of each average updated so far, by
    kind; ``None`` when a stop was requested meanwhile, which abandons the pass."""
    results, desc = {}, place(segment.here.stage, segment.here.epoch + 1)
    stops = run.stops
    net = stage.net
    candidates = {"raw": None, **{kind: average for kind, average in net.averages.items()
                                  if average.updates}}
    for kind, average in candidates.items():
        with weights_in(net.model, average.state_dict()) if average else contextlib.nullcontext():
            result = evaluate(net.model, stage.preprocess, stage.val_loader,
                              run.cfg.model.num_classes, desc="val", stops=stops,
                              precision=stage.precision)
        if result is None:
            return None
        results[kind] = finite_validation(kind, result, desc, segment.here.stage)
    return results


def finite_validation(kind: str, result: dict, where: str, stage_index: int) -> dict:
    """``result`` if its loss is finite; weights that give a non-finite validation loss
    end the run (they are never saved as best)."""
    if not math.isfinite(result["loss"]):
        raise UserError(f"the {kind} weights give a non-finite validation loss at {where} "
                        f"({result['loss']}); they are not saved as best: lower "
                        f"stages.{stage_index}.optimizer.lr or check train.ema / train.swa")
    return result


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
        "top5": correct5 / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "num_samples": total,
        "per_class_top1": [None if np.isnan(v) else float(v) for v in per_class],
    }
