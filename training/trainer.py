"""The staged training run: stages of epochs, each with its optimizer, schedule, data and loss.

Everything a run does is a function of the config and its position (stage, epoch,
micro-batch): the shuffle order and augmentation come from (seed, epoch), dropout from
Paddle re-seeded with (seed, epoch, micro-batch). A run resumed from a checkpoint
therefore continues exactly as the uninterrupted run would have.
"""

import math
import os
import signal

from data.cifar import pending_download as cifar_download
from data.dataset import eval_loader, run_splits, set_epoch, stage_loaders
from data.preprocess import DevicePreprocess
from losses import build_loss
from models.build import build_model, input_size
from models.build import pending_download as weights_download
from training.amp import Precision
from training.averaging import build_averages, evaluate_kinds
from training.engine import EpochProgress, evaluate, train_steps
from training.optim import (
    MasterCopies,
    build_optimizer,
    optimizer_state_for,
    portable_optimizer_state,
)
from training.stages import describe_stage, lr_scale, stage_data, stage_loss
from utils.checkpoint import (
    check_position,
    check_same_config,
    find_last,
    finished_state,
    load_last,
    resume_folder,
    save_best,
    save_last,
    weights_path,
)
from utils.cli import select_device
from utils.config import dump_config, to_plain
from utils.dist import any_rank, init, is_main, rank, world_size, wrap
from utils.download import ensure_downloadable
from utils.errors import Interrupted, UserError, is_out_of_memory
from utils.files import write_json
from utils.logger import RunLogger
from utils.plots import plot_curves
from utils.progress import set_mode as set_progress
from utils.report import best_line, epoch_line, place, position_text
from utils.run_folder import RunFolder
from utils.seeds import seed_everything
from utils.signals import StopRequests
from utils.tensor_io import as_paddle, load_state, load_tensors

KINDS = ("raw", "ema", "swa")


def _is_better(val, best):
    """A larger validation set supersedes a subset; on the same set, higher top-1 wins."""
    if best is None:
        return True
    return (val["num_samples"], val["top1"]) > (best["val_num_samples"], best["val_top1"])


class Trainer:
    """One training run over all stages of a config, resumable at any optimizer step."""

    def __init__(self, cfg, resume=None):
        self.cfg, self.out, self.seed = cfg, cfg.train.output_dir, cfg.train.seed
        device = select_device()
        init()
        seed_everything(self.seed)
        train, val, self.test = run_splits(cfg.data, cfg.model.num_classes, self.seed)
        self.splits = (train, val)
        self.state = {"position": {"stage": 0, "epoch": 0, "micro": 0}, "epoch_index": 0,
                      "global_step": 0, "skipped_steps": 0, "best": None, "progress": None,
                      "updates": {}, "config": to_plain(cfg), "tested": False}
        self.trees = {}
        if resume:
            folder = resume_folder(resume, self.out)
            self.state, self.trees = load_last(folder)
            self.state.setdefault("tested", False)
            check_same_config(self.state, cfg, folder)
            check_position(self.state, self.trees, cfg.stages, folder)
        self.precision = Precision(cfg.train.amp, device, cfg.train.amp_level)
        if "scaler" in self.trees and self.precision.scaling:
            self.precision.scaler.load_state_dict(self.trees["scaler"])
        self.model = build_model(cfg.model, load_pretrained=not resume, amp=self.precision.mode,
                                 image_size=cfg.data.image_size)
        if resume:
            load_state(self.model, self.trees["model"])
            print(f"resuming from {folder} at "
                  f"{position_text(self.state['position'], cfg.stages)}", flush=True)
        self.masters = MasterCopies(self.model, self.precision,  # casts the weights for O2
                                    as_paddle(self.trees["optimizer"]) if resume else None)
        self.optimizer = None
        self.train_model = wrap(self.model)  # DataParallel with ranks
        self.preprocess = DevicePreprocess(input_size(self.model))
        self.averages = build_averages(cfg.train, self.model, self.state, self.trees,
                                       self.masters.by_path())
        self.swa_start = (cfg.train.swa.stage % len(cfg.stages), cfg.train.swa.start_epoch)
        if is_main():
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.yaml"), "w", encoding="utf-8") as handle:
                handle.write(dump_config(cfg))
        validation = (f"{len(val[1])} held out for validation (data.val_split)"
                      if cfg.data.val_split else "the test split as validation (data.val_split: 0)")
        print(f"device {device}, rank {rank()} of {world_size()}; {len(train[1])} train images, "
              f"{validation}, {len(self.test[1])} test; output in {self.out}", flush=True)
        self.logger = RunLogger(self.out, keep_records=self.state["epoch_index"],
                                keep_steps=self.state["global_step"], enabled=is_main())
        self.stops = StopRequests()

    def fit(self):
        """Run the stages from the current position; return the best record.

        SIGINT/SIGTERM end the run at the next step with a checkpoint and
        :class:`Interrupted`; a non-finite loss per ``train.nan_policy``.
        """
        start = dict(self.state["position"])
        with self.stops:
            try:
                for stage_index in range(start["stage"], len(self.cfg.stages)):
                    self._run_stage(stage_index, start if stage_index == start["stage"] else None)
                self._final_test()
            finally:
                self.logger.close()
            if self.stops.requested:  # after the last epoch: nothing is left to interrupt
                print(f"{self.stops.requested} after the last epoch: training is complete; "
                      f"curves.png skipped (python -m utils.plots {self.out} draws it)",
                      flush=True)
            elif is_main():
                try:
                    print(f"curves in {plot_curves(self.out)}", flush=True)
                except (UserError, KeyError, TypeError) as exc:  # an edited metrics.jsonl
                    print(f"warning: curves.png not drawn: {exc}", flush=True)
        best = self.state["best"]
        if best is not None:
            print(best_line(best, weights_path(self.out, "best")), flush=True)
        return best

    def _final_test(self):
        """Evaluate the best and the last weights on the test split, once, at the end:
        records in metrics.jsonl, the best's numbers in best.json."""
        if self.state["tested"]:
            return
        loader = eval_loader(*self.test, self.cfg.data)
        last = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        chosen = {"last": ("raw", last)}
        if self.state["best"] is not None:
            weights, _ = load_tensors(weights_path(self.out, "best"))
            chosen["best"] = (self.state["best"]["kind"], weights)
        for which, (kind, weights) in chosen.items():
            load_state(self.model, weights)
            result = evaluate(self.model, self.preprocess, loader, self.cfg.model.num_classes,
                              desc=f"test ({which})", precision=self.precision)
            record = {"test": which, "kind": kind, "test_top1": result["top1"],
                      "test_top5": result["top5"], "test_loss": result["loss"],
                      "num_samples": result["num_samples"]}
            self.logger.log_test(record)
            print(f"test split, {which} weights ({kind}): top1 {result['top1']:.4f} top5 "
                  f"{result['top5']:.4f} loss {result['loss']:.4f} on {result['num_samples']}",
                  flush=True)
            if which == "best":
                self.state["best"].update({k: record[k] for k in
                                           ("test_top1", "test_top5", "test_loss")})
                if is_main():
                    write_json(os.path.join(self.out, "best.json"), self.state["best"])
        load_state(self.model, last)
        self.state["tested"] = True
        self._checkpoint(dict(self.state["position"]), None)

    def _run_stage(self, stage_index, start):
        """Build the stage's loss, loaders and optimizer; run its epochs until done or ``until``."""
        cfg, stage = self.cfg, self.cfg.stages[stage_index]
        data_cfg, loss_cfg = stage_data(cfg.data, stage), stage_loss(cfg.loss, stage)
        self.criterion = build_loss(loss_cfg)
        print(describe_stage(stage_index, stage, data_cfg, loss_cfg), flush=True)
        self.train_loader, self.val_loader = stage_loaders(data_cfg, self.seed,
                                                           cfg.train.accum_steps, *self.splits)
        sampler = self.train_loader.batch_sampler
        steps_per_epoch = sampler.full_length() // cfg.train.accum_steps
        if steps_per_epoch == 0:
            raise UserError(f"stage {stage_index}: fewer batches per epoch than "
                            f"train.accum_steps={cfg.train.accum_steps}")
        sampler.stop = steps_per_epoch * cfg.train.accum_steps
        if start and not (0 <= start["micro"] <= sampler.stop):
            raise UserError(f"the checkpoint's position (micro-batch {start['micro']} of stage "
                            f"{stage_index}) lies outside its {sampler.stop} micro-batches per "
                            f"epoch; it is damaged: resume from another copy or start again")
        self.optimizer, self.scheduler = build_optimizer(
            stage, self.model, steps_per_epoch, cfg.train, self.precision.half_weights,
            self.masters.by_name, lr_scale(cfg.train, data_cfg.batch_size))
        first_epoch = start["epoch"] if start else 0
        resumed = start if start and (start["micro"] or start.get("evaluating")) else None
        if start and (first_epoch, start["micro"]) != (0, 0):
            self.optimizer.set_state_dict(
                optimizer_state_for(self.model, as_paddle(self.trees["optimizer"])))
        for epoch in range(first_epoch, stage.epochs):
            if self._run_epoch(stage_index, epoch, resumed if epoch == first_epoch else None):
                break
        self.masters.carry(self.optimizer)

    def _run_epoch(self, stage_index, epoch, resumed):
        """Train, validate and finish one epoch; True when the stage is done.

        ``resumed`` is the saved position when the epoch was interrupted after some steps.
        """
        progress = (EpochProgress.resumed(self.state["progress"]) if resumed
                    else EpochProgress())
        here = {"stage": stage_index, "epoch": epoch}
        if not (resumed and resumed.get("evaluating")):
            self._train_epoch(here, progress)
            if "swa" in self.averages and (stage_index, epoch) >= self.swa_start:
                self.averages["swa"].update(self.model, self.masters.by_path(self.optimizer))
        results = self._validate(here, progress)
        return self._finish_epoch(here, progress, results)

    def _train_epoch(self, here, progress):
        """The epoch's optimizer steps from where ``progress`` stands; after each: the log,
        the EMA, a checkpoint when one is due, and a stop when one was requested."""
        cfg, state = self.cfg, self.state
        stage = cfg.stages[here["stage"]]
        set_epoch(self.train_loader, state["epoch_index"], start=progress.micro)
        desc = place(here["stage"], here["epoch"] + 1, stage.epochs)
        steps = train_steps(self.train_model, self.criterion, self.preprocess, self.train_loader,
                            self.optimizer, self.scheduler, progress, cfg.train.accum_steps,
                            (self.seed, state["epoch_index"]), desc, self.precision,
                            cfg.train.clip_grad_norm)
        try:
            for step in steps:
                # Only applied updates count as steps: a skipped one (non-finite loss under
                # nan_policy=skip, fp16 overflow) moves neither the schedule nor the EMA.
                if step.status == "nonfinite":
                    self._nonfinite(step.values, here, progress)
                if step.status == "applied":
                    self.logger.log_step(state["global_step"], step.values)
                    if "ema" in self.averages:
                        self.averages["ema"].update(self.model,
                                                    self.masters.by_path(self.optimizer))
                    state["global_step"] += 1
                every = cfg.train.save_every_steps
                stop = any_rank(self.stops.requested)
                if stop or (step.status == "applied" and every
                            and state["global_step"] % every == 0
                            and progress.micro < self.train_loader.batch_sampler.stop):
                    self._checkpoint(dict(here, micro=progress.micro), progress.summed())
                if stop:
                    raise self._interrupted(here)
        except Exception as exc:  # noqa: BLE001 - out of memory only; the rest goes on
            if not is_out_of_memory(exc):
                raise
            raise UserError(f"out of memory at {desc}, micro-batch {progress.micro + 1} of "
                            f"{self.train_loader.batch_sampler.full_length()}; the last "
                            f"checkpoint ({find_last(self.out) or 'none yet'}) is safe. Find a "
                            f"micro-batch that fits with python main.py ... --preflight, then "
                            f"raise train.accum_steps (now {cfg.train.accum_steps}) or set "
                            f"model.recompute=true") from None

    def _validate(self, here, progress):
        """The validation results of the raw weights and the averages; a stop requested
        meanwhile (one process: ranks cannot agree inside a pass) abandons the pass and ends
        the run with a checkpoint that validates again on resume."""
        stops = self.stops if world_size() == 1 else None
        results = evaluate_kinds(self.model, self.averages, lambda: evaluate(
            self.model, self.preprocess, self.val_loader, self.cfg.model.num_classes,
            desc="val", stops=stops, precision=self.precision))
        if results is None:
            self._checkpoint(dict(here, micro=progress.micro, evaluating=True),
                             progress.summed())
            raise self._interrupted(here)
        desc = place(here["stage"], here["epoch"] + 1)
        for kind, result in results.items():
            if not math.isfinite(result["loss"]):
                raise UserError(f"the {kind} weights give a non-finite validation loss at {desc} "
                                f"({result['loss']}); they are not saved as best: lower "
                                f"stages.{here['stage']}.optimizer.lr or check train.ema / "
                                f"train.swa")
        return results

    def _finish_epoch(self, here, progress, results):
        """Record the epoch, keep the best weights, checkpoint the next position, report;
        True when the stage is done (its epochs, or an ``until`` reached)."""
        cfg, state = self.cfg, self.state
        stage_index, epoch = here["stage"], here["epoch"]
        stage = cfg.stages[stage_index]
        stats = EpochProgress(**progress.summed()).means()
        val = results["raw"]
        record = {
            "stage": stage_index, "epoch": epoch + 1, "lr": self.optimizer.get_lr(),
            "train_loss": stats["loss"], "train_ce": stats["ce"], "train_kl": stats["kl"],
            "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
            "images_per_s": stats["images_per_s"], "grad_norm": stats["grad_norm"],
            "grad_norm_max": stats["grad_norm_max"], "overflow_steps": stats["overflow_steps"],
        }
        for kind in self.averages:
            record[f"val_top1_{kind}"] = results[kind]["top1"] if kind in results else None
        self.logger.log_epoch(state["epoch_index"], record)
        self._update_best(record, results, state["epoch_index"])
        reached = [key for key, goal in stage.until.items()
                   if goal is not None and val[key[len("val_"):]] >= goal]
        done = bool(reached) or epoch + 1 == stage.epochs
        state["epoch_index"] += 1
        self._checkpoint({"stage": stage_index + 1, "epoch": 0, "micro": 0} if done else
                         {"stage": stage_index, "epoch": epoch + 1, "micro": 0}, None)
        print(epoch_line(place(stage_index, epoch + 1, stage.epochs), stats, results,
                         stage_loss(cfg.loss, stage)), flush=True)
        if reached:
            print(f"stage {stage_index} ends early: {', '.join(reached)} reached", flush=True)
        finished = done and stage_index == len(cfg.stages) - 1
        if any_rank(self.stops.requested) and not finished:
            raise self._interrupted(here)
        return done

    def _nonfinite(self, values, here, progress):
        """Stop on a non-finite loss (or float32/bf16 gradient), or count it as skipped under
        ``train.nan_policy: skip``."""
        train, stage_index = self.cfg.train, here["stage"]
        step = progress.micro // train.accum_steps
        what = "loss" if values["grad_norm"] is None else "gradient"
        where = (f"{place(stage_index, here['epoch'] + 1)} step {step} (lr {values['lr']:.3g}, "
                 f"loss {values['loss']}"
                 + ("" if values["grad_norm"] is None else f", gradient norm {values['grad_norm']}")
                 + ")")
        last = find_last(self.out)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        fix = (f"lower stages.{stage_index}.optimizer.lr, add a warmup "
               f"(stages.{stage_index}.warmup.steps) or set train.clip_grad_norm")
        if train.nan_policy == "stop":
            raise UserError(f"the {what} is not finite at {where}; {kept}; {fix}, or set "
                            f"train.nan_policy=skip to drop such steps")
        self.state["skipped_steps"] += 1
        if self.state["skipped_steps"] > train.nan_max_skips:
            raise UserError(f"{self.state['skipped_steps']} steps had a non-finite loss or "
                            f"gradient, more than train.nan_max_skips={train.nan_max_skips} "
                            f"(last at {where}); {kept}; {fix}")
        print(f"skipped the update of {where}: non-finite {what} "
              f"({self.state['skipped_steps']}/{train.nan_max_skips} allowed)", flush=True)

    def _interrupted(self, here):
        """The :class:`Interrupted` to raise once the stop checkpoint is saved."""
        return Interrupted(self.stops.signum or signal.SIGTERM,
                           f"{self.stops.requested or 'SIGTERM'} at "
                           f"{place(here['stage'], here['epoch'] + 1)} (step "
                           f"{self.state['global_step']}); checkpoint saved in "
                           f"{find_last(self.out)}")

    def _update_best(self, record, results, epoch_index):
        """Keep the best of the raw, EMA and SWA weights if it beats the best so far."""
        kind = max(results, key=lambda k: (results[k]["top1"], -KINDS.index(k)))
        if _is_better(results[kind], self.state["best"]):
            self.state["best"] = dict(record, kind=kind, epoch_index=epoch_index,
                                      val_top1=results[kind]["top1"],
                                      val_num_samples=results[kind]["num_samples"],
                                      selected_on="val" if self.cfg.data.val_split else "test")
            if kind == "raw":
                weights = dict(self.model.state_dict(), **self.masters.by_path(self.optimizer))
            else:
                weights = self.averages[kind].state_dict()
            if is_main():
                save_best(self.out, weights, self.state["best"])

    def _checkpoint(self, position, progress):
        """Write the resume checkpoint for ``position`` (the next thing to do)."""
        self.state.update(position=position, progress=progress,
                          updates={kind: avg.updates for kind, avg in self.averages.items()})
        trees = {"model": self.model.state_dict(),
                 "optimizer": (portable_optimizer_state(self.model, self.optimizer)
                               if self.optimizer is not None else self.trees["optimizer"])}
        trees.update({kind: avg.state_dict() for kind, avg in self.averages.items()})
        if self.precision.scaling:
            trees["scaler"] = self.precision.scaler.state_dict()
        if is_main():
            save_last(self.out, trees, self.state)


def fit(cfg, resume=None, overwrite=False):
    """Run every stage of ``cfg`` (from a checkpoint with ``resume``: True or a path),
    holding ``train.output_dir`` meanwhile; ``overwrite`` moves an earlier run there aside."""
    select_device()  # first: it also takes SIGTERM back from Paddle's C++ handler
    set_progress(cfg.train.progress)
    folder = RunFolder(cfg.train.output_dir)
    if is_main():
        folder.hold(resume=bool(resume), overwrite=overwrite)
    try:
        if resume:
            state = finished_state(resume, cfg.train.output_dir, cfg.stages)
            if state is not None:
                check_same_config(state, cfg, resume_folder(resume, cfg.train.output_dir))
                print(f"the run in {cfg.train.output_dir} is complete (its final test is done); "
                      f"nothing to resume", flush=True)
                return state["best"]
        ensure_downloadable([item for item in (
            cifar_download(cfg.data), weights_download(cfg.model, load_pretrained=not resume))
            if item])
        return Trainer(cfg, resume).fit()
    finally:
        folder.release()
