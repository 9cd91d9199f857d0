"""The epoch loop on the run's side: one stage's training through a segment of an epoch,
with the run's step log, averages, checkpoints and stop requests around each optimizer step
(:func:`training.engine.train_steps`), and the validation of the raw weights and each
average (:func:`training.engine.evaluate`)."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Optional

from data.loader import set_epoch
from training import engine
from training.averaging import weights_in
from training.state import Position
from utils.errors import UserError
from utils.reports.text import place

if TYPE_CHECKING:
    from training.run import Run, Segment
    from training.stage import Stage


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
    for step in engine.train_steps(stage, loader, progress, (train.seed, run.state.epoch_index), desc):
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
            result = engine.evaluate(net.model, stage.preprocess, stage.val_loader,
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
