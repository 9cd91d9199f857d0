"""A training run's edges and its records.

:func:`training_run` is everything around the recipe that :func:`main.train` runs: the
device, the output folder held, a finished run recognised, every missing download named
at once, the checkpoint a resume starts from, stop requests, an out-of-memory turned into
one line. :class:`Run` is what the recipe records as it goes: the position and state a
checkpoint holds, the logs, the best weights and the final test.

Everything a run does is a function of the config and its position (stage, epoch,
micro-batch): the shuffle order and augmentation come from (seed, epoch), dropout from
Paddle re-seeded with (seed, epoch, micro-batch). A run resumed from a checkpoint
therefore continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Union

import paddle

from data.dataset import (
    FINGERPRINT,
    Split,
    data_identity,
    data_path_problem,
    eval_loader,
    validation_source,
)
from data.formats import FORMATS
from data.preprocess import DevicePreprocess
from models.build import input_size
from models.build import pending_download as weights_download
from models.resolution import fit_resolution
from training.averaging import weights_in
from training.engine import evaluate
from training.optim import optimizer_state_for, portable_optimizer_state
from training.recipe import final_image_size
from training.results import epoch_record, new_best, skip_nonfinite, test_line
from training.stage import RunModel, Stage
from training.stage_check import validate_stages
from training.state import (
    EpochProgress,
    Position,
    RunState,
    checkpoint_trees,
    finished,
    restore,
)
from training.teacher import check_teacher_pin
from utils.checkpoint import (
    find_last,
    load_last,
    resume_folder,
    save_best,
    save_last,
    weights_path,
    write_best_json,
)
from utils.config import dump_config, to_plain
from utils.errors import Interrupted, UserError, is_out_of_memory, out_of_memory_error
from utils.io.download import ensure_downloadable
from utils.io.files import path_problem, write_atomically
from utils.io.tensor_io import as_paddle, load_tensors
from utils.reports.logger import RunLogger
from utils.reports.plots import curves_at_end
from utils.reports.progress import in_notebook, one_output
from utils.reports.progress import set_mode as set_progress
from utils.reports.text import best_line, epoch_line, place, run_line
from utils.run_folder import RESUME_FILE, RunFolder
from utils.runtime.device import select_device
from utils.runtime.dist import any_rank, init, is_main
from utils.runtime.invocation import environment_line
from utils.runtime.seeds import seed_everything
from utils.runtime.signals import StopRequests
from utils.schema import Config


@dataclass
class Segment:
    """A stretch of an epoch that trains, then validates: the whole epoch, or with
    ``train.eval_every_steps`` up to the next validation. ``here`` is the epoch's position,
    ``progress`` where the epoch stands; ``trains`` is false for a segment that was trained
    before a stop and only validates on resume."""

    here: Position
    progress: EpochProgress
    trains: bool = True


class Run:
    """What a run records in its folder while the recipe trains: its :class:`RunState`
    (position, counts, best record), the logs, checkpoints, the best weights and the final
    test. ``complete`` when the folder already holds this run, finished."""

    def __init__(self, cfg: Config, state: RunState, restored: dict, device: str,
                 complete: bool = False) -> None:
        self.cfg, self.out = cfg, cfg.train.output_dir
        self.state, self.restored, self.device, self.complete = state, restored, device, complete
        self.net: Optional[RunModel] = None
        self.stage: Optional[Stage] = None
        self.segment: Optional[Segment] = None
        self.class_names: list = []
        self.logger: Optional[RunLogger] = None
        self.stops = StopRequests()
        self.start = replace(state.position)
        self.validation = validation_source(cfg.data)  # own, held_out or test
        self.resume_with: Optional[str] = None  # the command that continues the run

    def begin(self, net: RunModel, splits: tuple[Split, Split, Split], class_names: list) -> None:
        """Take the run's model: pin its teacher, check every stage from the current one
        against it and say what the run trains on."""
        self.net, self.class_names = net, class_names
        if net.teacher is not None:
            check_teacher_pin(self.state.teacher, net.teacher, self.out)
            self.state.teacher = net.teacher.pin
        validate_stages(self.cfg, net.model, net.base_size, net.teacher, self.start.stage)
        if self.state.data is None:  # a fresh run (or one from before fingerprints)
            self.state.data = data_identity(self.cfg.data, self.cfg.model.num_classes)
        print(run_line(self.device, *(len(split.labels) for split in splits), self.out,
                       self.validation), flush=True)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The stages and the final test: the config is written and the logs opened (only
        now: a run stopped by its checks leaves a folder it can start in again), and
        SIGINT/SIGTERM/SIGHUP become a stop request that the loop honours at its next step
        (:meth:`stop_requested`); the logs are closed and the curves drawn at the end."""
        if is_main():
            os.makedirs(self.out, exist_ok=True)
            write_atomically(os.path.join(self.out, "config.yaml"),
                             dump_config(self.cfg).encode())
            if self.resume_with:  # for a terminal that is gone when the run stops
                write_atomically(os.path.join(self.out, RESUME_FILE),
                                 f"{environment_line()}\n{self.resume_with}\n"
                                 .encode("utf-8", "surrogateescape"))  # paths' exact bytes
        self.logger = RunLogger(self.out, keep_records=self.state.records,
                                keep_steps=self.state.global_step, enabled=is_main())
        with self.stops:
            try:
                yield
            finally:
                self.logger.close()
            if self.stops.requested or is_main():
                curves_at_end(self.out, self.stops.requested)

    def segments(self, stage: Stage) -> Iterator[Segment]:
        """The segments ``stage`` trains and validates, from where the run stands: a resumed
        stage starts at its checkpoint's epoch, micro-batch and pending validation. The
        caller stops iterating when :meth:`finish_epoch` says the stage is done."""
        self.stage, start = stage, self.start if self.start.stage == stage.index else None
        if start:
            stage.length.check_start(stage.index, start)
            if (start.epoch, start.micro) != (0, 0):
                stage.optimizer.set_state_dict(
                    optimizer_state_for(stage.net.model, as_paddle(self.restored["optimizer"])))
        midway = start if start and (start.micro or start.evaluating) else None
        for epoch in range(start.epoch if start else 0, stage.length.epochs):
            here = Position(stage.index, epoch)
            resumed = midway is not None and epoch == midway.epoch
            progress = self.state.progress.resumed() if resumed else EpochProgress()
            self.segment = Segment(here, progress, not (resumed and midway.evaluating))
            while True:
                yield self.segment
                if stage.length.ends_epoch(epoch, progress.micro):
                    break
                progress = EpochProgress(micro=progress.micro)  # the epoch's next segment
                self.segment = Segment(here, progress)

    # What the training loop reports after each optimizer step --------------------------

    def log_step(self, values: dict, optimizer: paddle.optimizer.Optimizer) -> None:
        """An applied step: its log line and the EMA."""
        self.logger.log_step(self.state.global_step, values)
        if "ema" in self.net.averages:
            self.net.averages["ema"].update(self.net.model, self.net.masters.by_path(optimizer))
        self.state.global_step += 1

    def update_swa(self, here: Position, optimizer: paddle.optimizer.Optimizer) -> None:
        """At an epoch's end, from ``train.swa``'s start on: the SWA."""
        swa = self.cfg.train.swa
        if "swa" in self.net.averages and \
                (here.stage, here.epoch) >= (swa.stage % len(self.cfg.stages), swa.start_epoch):
            self.net.averages["swa"].update(self.net.model, self.net.masters.by_path(optimizer))

    def skip_nonfinite(self, values: dict, here: Position, step: int) -> None:
        """A step whose loss or gradient is not finite: stop, or skip it
        (``train.nan_policy``)."""
        self.state.skipped_steps = skip_nonfinite(
            self.cfg.train, self.state.skipped_steps, values, here.stage,
            f"{place(here.stage, here.epoch + 1)} step {step}", find_last(self.out))

    def step_checkpoint_due(self) -> bool:
        """Whether ``train.save_every_steps`` falls at the step just applied."""
        every = self.cfg.train.save_every_steps
        return bool(every) and self.state.global_step % every == 0

    def stop_requested(self) -> bool:
        """Whether a stop was requested on any rank (all ranks agree)."""
        return any_rank(self.stops.requested)

    # After each validation --------------------------------------------------------------

    def finish_epoch(self, stage: Stage, segment: Segment, results: Optional[dict]) -> bool:
        """Record the epoch (or the segment of it since the last validation), keep the best
        weights, checkpoint the next position, report; True when the stage is done (its
        steps, or an ``until`` reached). ``results`` ``None``: the validation was abandoned
        for a stop, which ends the run with a checkpoint that validates again on resume."""
        here, progress = segment.here, segment.progress
        if results is None:
            self.checkpoint(Position(here.stage, here.epoch, progress.micro, evaluating=True),
                            progress.summed())
            raise self.interrupted(here)
        cfg, state, length = self.cfg, self.state, stage.length
        stats = progress.summed().means()
        step = length.step_at(here.epoch, progress.micro)
        record = epoch_record(here.stage, here.epoch + 1, step, lr=stage.optimizer.get_lr(),
                              stats=stats, results=results, averages=self.net.averages)
        self.logger.log_epoch(state.records, record)
        if input_size(self.net.model) == (final_image_size(cfg) or self.net.base_size):
            self.keep_best(record, results)  # the resolution the weights are evaluated at
        reached = [key for key, goal in stage.config.until.items()
                   if goal is not None and results["raw"][key[len("val_"):]] >= goal]
        epoch_ends = length.ends_epoch(here.epoch, progress.micro)
        done = bool(reached) or (epoch_ends and here.epoch + 1 == length.epochs)
        state.records += 1
        state.epoch_index += done or epoch_ends  # counts the data epochs begun: their seeds
        if done:
            self.checkpoint(Position(here.stage + 1), None)
        elif epoch_ends:
            self.checkpoint(Position(here.stage, here.epoch + 1), None)
        else:
            self.checkpoint(Position(here.stage, here.epoch, progress.micro),
                            EpochProgress(micro=progress.micro))
        where = place(here.stage, here.epoch + 1, length.epochs)
        if cfg.train.eval_every_steps:
            where += f", step {step}/{length.steps}"
        print(epoch_line(where, stats, results, stage.criterion.in_words(stats),
                         brief=in_notebook()), flush=True)
        if reached:
            print(f"stage {here.stage} ends early: {', '.join(reached)} reached", flush=True)
        last = done and here.stage == len(cfg.stages) - 1
        if self.stop_requested() and not last:
            raise self.interrupted(here)
        return done

    def keep_best(self, record: dict, results: dict) -> None:
        """Save the best of the raw, EMA and SWA weights if it beats the best so far."""
        best = new_best(record, results, self.state.epoch_index, self.state.best,
                        "test" if self.validation == "test" else "val")
        if best is None:
            return
        self.state.best = best
        net = self.net
        if best["kind"] == "raw":
            weights = dict(net.model.state_dict(), **net.masters.by_path(self.stage.optimizer))
        else:
            weights = net.averages[best["kind"]].state_dict()
        if is_main():
            save_best(self.out, weights, best, self.class_names)

    def checkpoint(self, position: Position, progress: Optional[EpochProgress]) -> None:
        """Write the resume checkpoint for ``position`` (the next thing to do) with the
        progress of the epoch it stops in (``None`` at an epoch's start). Between stages,
        when no optimizer is alive, the optimizer file is the last checkpoint's."""
        self.state.position, self.state.progress = position, progress
        net = self.net
        self.state.updates = {kind: avg.updates for kind, avg in net.averages.items()}
        if not is_main():
            return
        stage = self.stage
        if stage is not None and not stage.released:
            optimizer = portable_optimizer_state(net.model, stage.optimizer)
        elif "optimizer" in self.restored:
            optimizer = self.restored["optimizer"]
        else:
            optimizer = load_last(find_last(self.out))[1]["optimizer"]
        save_last(self.out, checkpoint_trees(net.model, optimizer, net.averages,
                                             net.precision), self.state.to_json(),
                  self.class_names)

    def interrupted(self, here: Position) -> Interrupted:
        """The :class:`Interrupted` to raise once the stop checkpoint is saved."""
        return Interrupted(self.stops.signum or signal.SIGTERM,
                           f"{self.stops.requested or 'SIGTERM'} at "
                           f"{place(here.stage, here.epoch + 1)} ({self.state.global_step} "
                           f"optimizer steps into the whole run); checkpoint saved in "
                           f"{find_last(self.out)}")

    # The end --------------------------------------------------------------------------

    def final_test(self, test: Split) -> None:
        """Evaluate the best and the last weights on the test split, once, at the end, both
        at the model's resolution: records in metrics.jsonl, the best's numbers in
        best.json. The model keeps its last weights."""
        if self.state.tested:
            return
        net, best = self.net, self.state.best
        size = input_size(net.model)
        loader = eval_loader(test, self.cfg.data, size)
        chosen = {"last": ("raw", None)}
        if best is not None:  # at the model's resolution, if a stage at another one saved it
            chosen["best"] = (best["kind"], fit_resolution(
                load_tensors(weights_path(self.out, "best"))[0], net.model))
        for which, (kind, weights) in chosen.items():
            with (weights_in(net.model, weights) if weights is not None
                  else contextlib.nullcontext()):
                result = evaluate(net.model, DevicePreprocess(size), loader,
                                  self.cfg.model.num_classes, desc=f"test ({which})",
                                  precision=net.precision)
            record = {"test": which, "kind": kind, "test_top1": result["top1"],
                      "test_top5": result["top5"], "test_loss": result["loss"],
                      "num_samples": result["num_samples"]}
            self.logger.log_test(record)
            print(test_line(record), flush=True)
            if which == "best":
                best.update({k: record[k] for k in ("test_top1", "test_top5", "test_loss")})
                if is_main():
                    write_best_json(self.out, best, self.class_names)
        self.state.tested = True
        self.checkpoint(self.state.position, None)


@contextlib.contextmanager
def training_run(cfg: Config, resume: Union[bool, str, None] = None,
                 overwrite: bool = False, resume_with: Optional[str] = None,
                 on_device: Optional[Callable[[Config, str], None]] = None) -> Iterator[Run]:
    """The edges of a run of ``cfg`` (from a checkpoint with ``resume``: True or a path;
    ``overwrite`` moves an earlier run aside): the device (``on_device(cfg, device)`` is
    called as soon as it is chosen, before anything can fail), ``train.output_dir`` held
    meanwhile, a complete run recognised (the :class:`Run` yielded is then ``complete``),
    every missing download named at once, the checkpoint read, the seeds set, the command
    ``resume_with`` (that continues the run) kept in its ``RESUME.txt``; an
    out-of-memory in the block ends in one line after a safe checkpoint. In a notebook
    what the block prints is one output."""
    if resume and overwrite:
        raise UserError("--resume continues the run in train.output_dir and --overwrite moves "
                        "it aside to start afresh: choose one of them")
    with one_output():
        # First: it also takes SIGTERM back from Paddle's C++ handler.
        device = select_device(cfg.train.deterministic)
        if on_device is not None:
            on_device(cfg, device)
        set_progress(cfg.train.progress)
        out = cfg.train.output_dir
        done = None if resume or overwrite else complete_run(out, cfg)
        if done is not None:  # the same command again: its run is there, nothing to train
            print(f"the run in {out} is complete with this config (its final test is done); "
                  f"nothing to train (--overwrite trains it again)", flush=True)
            print(best_line(done.best, weights_path(out, "best")), flush=True)
            yield Run(cfg, done, {}, device, complete=True)
            return
        # What the run reads is checked before anything is moved aside or written.
        inputs = [] if resume else run_inputs(cfg, resume=False)
        folder = RunFolder(out)
        if is_main():
            folder.hold(resume=bool(resume), overwrite=overwrite, inputs=inputs)
        try:
            run = _start(cfg, resume, device)
            run.resume_with = resume_with
            with _out_of_memory_as_error(run):
                yield run
        finally:
            folder.release()
        if not run.complete and run.state.best is not None:
            print(best_line(run.state.best, weights_path(out, "best")), flush=True)


def _start(cfg: Config, resume, device: str) -> Run:
    """The :class:`Run` of ``cfg`` on ``device``: fresh, or from the checkpoint ``resume``
    names (``complete`` when that run has had its final test)."""
    out = cfg.train.output_dir
    if resume:
        folder = resume_folder(resume, out)
        state = finished(folder, cfg)
        if state is not None:
            print(f"the run in {out} is complete (its final test is done); nothing to "
                  f"resume", flush=True)
            return Run(cfg, state, {}, device, complete=True)
    if resume:  # a fresh run's inputs were checked before its folder was taken
        run_inputs(cfg, resume=True)
    init()
    seed_everything(cfg.train.seed)
    state, restored = RunState(config=to_plain(cfg)), {}
    if resume:
        state, restored = restore(folder, cfg)
        print(f"resuming from {folder} at {state.position.in_words(cfg.stages)}",
              flush=True)
    return Run(cfg, state, restored, device)


def run_inputs(cfg: Config, resume: bool) -> list[tuple[str, str]]:
    """The files the config names that the run reads (``(setting, path)``: the pretrained
    weights, which a resume does not read, a teacher's, the data), checked with the downloads
    it needs: whatever is missing or cannot be fetched is one :class:`UserError` naming it
    all."""
    pretrained = cfg.model.pretrained if isinstance(cfg.model.pretrained, str) else None
    distill = cfg.distill
    named = [(key, path) for key, path in (
        ("model.pretrained", None if resume else pretrained),
        ("distill.teacher", distill and os.path.isdir(distill.teacher) and distill.teacher),
        ("distill.weights", distill and distill.weights), ("data.path", cfg.data.path)) if path]
    absent = [data_path_problem(cfg.data) if key == "data.path" else f"{key} {path} {problem}"
              for key, path in named for problem in [path_problem(path, "any")] if problem]
    ensure_downloadable([item for item in (
        FORMATS[cfg.data.name].download(cfg.data),
        weights_download(cfg.model, load_pretrained=not resume))
        if item], absent=absent)
    if absent:
        raise UserError("; ".join(absent))
    return named


@contextlib.contextmanager
def _out_of_memory_as_error(run: Run) -> Iterator[None]:
    """An out-of-memory inside the block as one :class:`UserError` that names where the run
    was and what to change."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - out of memory only; the rest goes on
        if not is_out_of_memory(exc) or run.segment is None:
            raise
        here, stage = run.segment.here, run.stage
        where = (f"{place(here.stage, here.epoch + 1, stage.length.epochs)}, micro-batch "
                 f"{run.segment.progress.micro + 1} of "
                 f"{stage.train_loader.batch_sampler.full_length()}")
        raise out_of_memory_error(where, find_last(run.out),
                                  run.cfg.train.accum_steps) from None


def complete_run(out: str, cfg: Config) -> Optional[RunState]:
    """The state of a complete run of ``cfg`` (the same config, its final test done) in
    ``out``, or ``None`` (no run there, an unfinished one, or one of another config)."""
    folder = find_last(out) if os.path.isdir(out) else None
    if folder is None:
        return None
    try:
        state = finished(folder, cfg, resuming=False)
    except UserError:  # another config, or damaged: the folder check says what it holds
        return None
    if state is not None:
        _still_complete(out, cfg, state)
    return state


def _still_complete(out: str, cfg: Config, state: RunState) -> None:
    """One error when a complete run's outputs or data no longer agree with what it tested:
    its best weights gone or damaged, the data at ``data.path`` changed since."""
    if state.best is not None:
        try:
            load_tensors(weights_path(out, "best"))
        except (UserError, OSError) as exc:
            raise UserError(f"the run in {out} has finished, but its best weights are not "
                            f"usable ({exc}); evaluate its last weights with python val.py "
                            f"-c CONFIG --weights {weights_path(out, 'raw')}, or train again "
                            f"with --overwrite") from None
    recorded = state.data if (state.data or "").startswith(FINGERPRINT) else None
    try:
        now, unreadable = data_identity(cfg.data, cfg.model.num_classes), ""
    except UserError as exc:  # here, but no longer what the reader reads
        now, unreadable = "", f": {exc}"
    if recorded is not None and now is not None and now != recorded:
        where = (f"data.path={cfg.data.path}" if cfg.data.path else
                 FORMATS[cfg.data.name].source(cfg.data))  # e.g. a mounted or cached archive
        raise UserError(f"the run in {out} finished on other data than {where} holds now "
                        f"(its files changed since it trained{unreadable}); to train on the "
                        f"data as it is, pass --overwrite or another train.output_dir")
