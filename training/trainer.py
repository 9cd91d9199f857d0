"""The staged training run: stages of epochs, each with its optimizer, schedule, data and loss.

Everything a run does is a function of the config and its position (stage, epoch,
micro-batch): the shuffle order and augmentation come from (seed, epoch), dropout from
Paddle re-seeded with (seed, epoch, micro-batch). A run resumed from a checkpoint
therefore continues exactly as the uninterrupted run would have.
"""

import os
from contextlib import nullcontext
from dataclasses import replace

from data.dataset import run_splits, stage_loaders, validation_source
from data.loader import set_epoch
from data.preprocess import DevicePreprocess
from data.samples import shipping_line
from losses import build_loss
from models.build import input_size
from models.teacher import build_teacher, check_teacher_pin
from training.amp import Precision
from training.averaging import build_averages, weights_in
from training.engine import evaluate, train_steps
from training.optim import build_optimizer, optimizer_state_for
from training.outputs import RunOutputs
from training.results import epoch_record, finite_validation, skip_nonfinite
from training.stage_check import check_stages, validate_stages
from training.stage_model import prepare_stage, run_model
from training.stages import (
    StageLength,
    describe_stage,
    final_image_size,
    lr_scale,
    stage_data,
    stage_loss,
)
from training.state import EpochProgress, Position, RunState, restore
from utils.checkpoint import find_last, resume_folder
from utils.config import dump_config, to_plain
from utils.errors import is_out_of_memory, out_of_memory_error
from utils.io.files import write_atomically
from utils.io.tensor_io import as_paddle
from utils.reports.logger import RunLogger
from utils.reports.plots import curves_at_end
from utils.reports.text import epoch_line, place, position_text, run_line
from utils.runtime.device import select_device
from utils.runtime.dist import any_rank, init, is_main, world_size
from utils.runtime.seeds import seed_everything
from utils.runtime.signals import StopRequests


class Trainer(RunOutputs):
    """One training run over all stages of a config, resumable at any optimizer step.

    Where things happen: an optimizer step in :func:`training.engine.train_steps`, which
    :meth:`_train_epoch` iterates; after each step, in :meth:`_train_epoch` and only there,
    the step log, the EMA update, a checkpoint when one is due and a stop when one was
    requested. Epoch-end checkpoints and the best weights: :meth:`_finish_epoch`.
    """

    def __init__(self, cfg, resume=None):
        self.cfg, self.out, self.seed = cfg, cfg.train.output_dir, cfg.train.seed
        device = select_device()
        init()
        seed_everything(self.seed)
        train, val, self.test, self.class_names = run_splits(cfg.data, cfg.model.num_classes,
                                                             self.seed)
        self.splits = (train, val)
        self.state, self.restored = RunState(config=to_plain(cfg)), {}
        if resume:
            folder = resume_folder(resume, self.out)
            self.state, self.restored = restore(folder, cfg)
        self.device, self.precision = device, Precision(cfg.train.amp, device, cfg.train.amp_level)
        self.model, self.masters, self.base_size = run_model(cfg, self.precision, self.restored)
        if resume:
            print(f"resuming from {folder} at "
                  f"{position_text(self.state.position, cfg.stages)}", flush=True)
        self.optimizer = self.train_model = None
        self.preprocess = DevicePreprocess(input_size(self.model))
        self.teacher = (build_teacher(cfg.distill, cfg.model.num_classes, self.precision)
                        if cfg.distill else None)
        if self.teacher is not None:
            check_teacher_pin(self.state.teacher, self.teacher, self.out)
            self.state.teacher = self.teacher.pin
        validate_stages(cfg, self.model, self.base_size, self.teacher, self.state.position.stage)
        self.averages = build_averages(cfg.train, self.model, self.state.updates, self.restored,
                                       self.masters.by_path())
        self.swa_start = (cfg.train.swa.stage % len(cfg.stages), cfg.train.swa.start_epoch)
        if is_main():
            os.makedirs(self.out, exist_ok=True)
            write_atomically(os.path.join(self.out, "config.yaml"), dump_config(cfg).encode())
        self.validation = validation_source(cfg.data)  # own, held_out or test
        print(run_line(device, len(train.labels), len(val.labels), len(self.test.labels),
                       self.out, self.validation), flush=True)
        self.logger = RunLogger(self.out, keep_records=self.state.records,
                                keep_steps=self.state.global_step, enabled=is_main())
        self.stops = StopRequests()

    def fit(self):
        """Run the stages from the current position, then the final test; return the best
        record. SIGINT/SIGTERM end the run at the next step with a checkpoint and
        :class:`Interrupted`; a non-finite loss per ``train.nan_policy``."""
        start = replace(self.state.position)
        if self.cfg.train.check_stages and start.stage < len(self.cfg.stages):
            check_stages(self.cfg, self.precision, self.teacher, start.stage, self.device)
        with self.stops:
            try:
                for stage_index in range(start.stage, len(self.cfg.stages)):
                    self._run_stage(stage_index, start if stage_index == start.stage else None)
                self._final_test()
            finally:
                self.logger.close()
            if self.stops.requested or is_main():
                curves_at_end(self.out, self.stops.requested)
        return self.state.best

    def _run_stage(self, stage_index, start):
        """Build the stage's loss, loaders and optimizer; run its epochs until done or ``until``.
        ``start`` is the position a resumed run starts this stage from."""
        cfg, stage = self.cfg, self.cfg.stages[stage_index]
        data_cfg, loss_cfg = stage_data(cfg.data, stage), stage_loss(cfg.loss, stage)
        self.criterion = build_loss(loss_cfg, cfg.distill)
        size = data_cfg.image_size or self.base_size
        print(describe_stage(stage_index, stage, data_cfg, loss_cfg, size, cfg.distill),
              flush=True)
        self.train_model, self.preprocess = prepare_stage(
            self.model, stage_index, stage, size, self.averages, self.masters, self.teacher,
            self.train_model)
        self.train_loader, self.val_loader = stage_loaders(data_cfg, self.seed,
                                                           cfg.train.accum_steps, size, *self.splits)
        print(shipping_line(self.train_loader.dataset, data_cfg.num_workers), flush=True)
        self.length = StageLength.measured(stage_index, stage, self.train_loader.batch_sampler,
                                           cfg.train.accum_steps, start)
        self.optimizer, self.scheduler = build_optimizer(
            stage, self.model, self.length.steps_per_epoch, cfg.train, self.precision.half_weights,
            self.masters.by_name, lr_scale(cfg.train, data_cfg.batch_size))
        first_epoch = start.epoch if start else 0
        if start and (start.epoch, start.micro) != (0, 0):
            self.optimizer.set_state_dict(
                optimizer_state_for(self.model, as_paddle(self.restored["optimizer"])))
        midway = start if start and (start.micro or start.evaluating) else None
        for epoch in range(first_epoch, self.length.epochs):
            if self._run_epoch(Position(stage_index, epoch),
                               midway if epoch == first_epoch else None):
                break
        self.masters.carry(self.optimizer)

    def _run_epoch(self, here, midway):
        """Train, validate and finish the epoch at ``here`` (with ``train.eval_every_steps``,
        in segments: train to the next evaluation, validate, finish); True when the stage is
        done. ``midway`` is the saved position when the epoch was stopped after some steps."""
        progress = self.state.progress.resumed() if midway else EpochProgress()
        evaluating = midway is not None and midway.evaluating
        while True:
            if not evaluating:
                self._train_epoch(here, progress)
                if ("swa" in self.averages and self.length.ends_epoch(here.epoch, progress.micro)
                        and (here.stage, here.epoch) >= self.swa_start):
                    self.averages["swa"].update(self.model, self.masters.by_path(self.optimizer))
            evaluating = False
            results = self._validate(here, progress)
            if self._finish_epoch(here, progress, results):
                return True
            if self.length.ends_epoch(here.epoch, progress.micro):
                return False
            progress = EpochProgress(micro=progress.micro)  # the epoch's next segment

    def _train_epoch(self, here, progress):
        """The epoch's optimizer steps from where ``progress`` stands; after each: the log,
        the EMA, a checkpoint when one is due, and a stop when one was requested."""
        cfg, state = self.cfg, self.state
        set_epoch(self.train_loader, state.epoch_index, start=progress.micro)
        self.train_loader.batch_sampler.stop = self.length.window(here.epoch)
        desc = place(here.stage, here.epoch + 1, self.length.epochs)
        steps = train_steps(self.train_model, self.criterion, self.preprocess, self.train_loader,
                            self.optimizer, self.scheduler, progress, cfg.train.accum_steps,
                            (self.seed, state.epoch_index), desc, self.precision,
                            cfg.train.clip_grad_norm, self.teacher,
                            cfg.stages[here.stage].frozen_mode == "eval")
        try:
            for step in steps:
                # Only applied updates count as steps: a skipped one (non-finite loss under
                # nan_policy=skip, fp16 overflow) moves neither the schedule nor the EMA.
                if step.status == "nonfinite":  # stop, or skip (train.nan_policy)
                    state.skipped_steps = skip_nonfinite(
                        cfg.train, state.skipped_steps, step.values, here.stage,
                        f"{place(here.stage, here.epoch + 1)} step "
                        f"{progress.micro // cfg.train.accum_steps}", find_last(self.out))
                if step.status == "applied":
                    self.logger.log_step(state.global_step, step.values)
                    if "ema" in self.averages:
                        self.averages["ema"].update(self.model,
                                                    self.masters.by_path(self.optimizer))
                    state.global_step += 1
                every = cfg.train.save_every_steps
                stop = any_rank(self.stops.requested)
                validate = self.length.eval_due(here.epoch, progress.micro,
                                                cfg.train.eval_every_steps)
                if stop or (step.status == "applied" and every
                            and state.global_step % every == 0
                            and progress.micro < self.train_loader.batch_sampler.stop):
                    self._checkpoint(Position(here.stage, here.epoch, progress.micro,
                                              evaluating=validate), progress.summed())
                if stop:
                    raise self._interrupted(here)
                if validate:
                    break  # validate now; the epoch goes on from here afterwards
        except Exception as exc:  # noqa: BLE001 - out of memory only; the rest goes on
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory_error(
                f"{desc}, micro-batch {progress.micro + 1} of "
                f"{self.train_loader.batch_sampler.full_length()}", find_last(self.out),
                cfg.train.accum_steps) from None
        skipped = self.train_loader.dataset.take_skipped()
        if skipped:
            print(f"warning: {skipped} unreadable training images were replaced by the next "
                  f"readable ones in {desc}", flush=True)

    def _validate(self, here, progress):
        """The validation results of the raw weights and of each average updated so far; a
        stop requested meanwhile (one process: ranks cannot agree inside a pass) abandons the
        pass and ends the run with a checkpoint that validates again on resume."""
        stops = self.stops if world_size() == 1 else None
        results, desc = {}, place(here.stage, here.epoch + 1)
        candidates = {"raw": None, **{kind: average for kind, average in self.averages.items()
                                      if average.updates}}
        for kind, average in candidates.items():
            with weights_in(self.model, average.state_dict()) if average else nullcontext():
                result = evaluate(self.model, self.preprocess, self.val_loader,
                                  self.cfg.model.num_classes, desc="val", stops=stops,
                                  precision=self.precision)
            if result is None:
                self._checkpoint(Position(here.stage, here.epoch, progress.micro,
                                          evaluating=True), progress.summed())
                raise self._interrupted(here)
            results[kind] = finite_validation(kind, result, desc, here.stage)
        return results

    def _finish_epoch(self, here, progress, results):
        """Record the epoch (or the segment of it since the last validation), keep the best
        weights, checkpoint the next position, report; True when the stage is done (its
        steps, or an ``until`` reached)."""
        cfg, state = self.cfg, self.state
        stage = cfg.stages[here.stage]
        stats, val = progress.summed().means(), results["raw"]
        step = self.length.step_at(here.epoch, progress.micro)
        record = epoch_record(here.stage, here.epoch + 1, step, self.optimizer.get_lr(), stats,
                              results, self.averages)
        self.logger.log_epoch(state.records, record)
        if input_size(self.model) == (final_image_size(cfg) or self.base_size):
            self._keep_best(record, results)  # the resolution the weights are evaluated at
        reached = [key for key, goal in stage.until.items()
                   if goal is not None and val[key[len("val_"):]] >= goal]
        epoch_ends = self.length.ends_epoch(here.epoch, progress.micro)
        done = bool(reached) or (epoch_ends and here.epoch + 1 == self.length.epochs)
        state.records += 1
        state.epoch_index += done or epoch_ends  # counts the data epochs begun: their seeds
        if done:
            self._checkpoint(Position(here.stage + 1), None)
        elif epoch_ends:
            self._checkpoint(Position(here.stage, here.epoch + 1), None)
        else:
            self._checkpoint(Position(here.stage, here.epoch, progress.micro),
                             EpochProgress(micro=progress.micro))
        where = place(here.stage, here.epoch + 1, self.length.epochs)
        if cfg.train.eval_every_steps:
            where += f", step {step}/{self.length.steps}"
        print(epoch_line(where, stats, results, stage_loss(cfg.loss, stage), cfg.distill),
              flush=True)
        if reached:
            print(f"stage {here.stage} ends early: {', '.join(reached)} reached", flush=True)
        finished = done and here.stage == len(cfg.stages) - 1
        if any_rank(self.stops.requested) and not finished:
            raise self._interrupted(here)
        return done
