"""The staged training run: stages of epochs, each with its optimizer, schedule, data and loss.

Everything a run does is a function of the config and its position (stage, epoch,
micro-batch): the shuffle order and augmentation come from (seed, epoch), dropout from
Paddle re-seeded with (seed, epoch, micro-batch). A run resumed from a checkpoint
therefore continues exactly as the uninterrupted run would have.
"""

import math
import os
import signal

import paddle

from data.dataset import (
    ImageArrayDataset,
    build_loader,
    check_labels,
    eval_loader,
    load_split,
    set_epoch,
    subset_indices,
)
from data.preprocess import DevicePreprocess
from engine import EpochProgress, evaluate, train_one_epoch
from losses import build_loss
from models.build import build_model, input_size
from utils.amp import Precision
from utils.averaging import build_averages, evaluate_kinds
from utils.checkpoint import (
    check_position,
    find_last,
    first_difference,
    load_last,
    resume_folder,
    save_best,
    save_last,
    weights_path,
)
from utils.cli import derived_seed, seed_everything, select_device
from utils.config import dump_config, to_plain
from utils.dist import any_rank, init, is_main, rank, world_size, wrap
from utils.errors import Interrupted, UserError
from utils.logger import RunLogger
from utils.optim import MasterCopies, build_optimizer, optimizer_state_for, portable_optimizer_state
from utils.plots import plot_curves
from utils.run_folder import RunFolder
from utils.signals import StopRequests
from utils.stages import describe_stage, stage_data, stage_loss
from utils.tensor_io import as_paddle, load_state

TRAIN_SUBSET_STREAM, VAL_SUBSET_STREAM = 0, 1
KINDS = ("raw", "ema", "swa")
# Keys that may change between a run and its resume without changing the results.
# nan_policy and nan_max_skips matter only once a loss is not finite, where the old policy
# would have stopped or skipped (a resume after such a stop may relax them).
RESUMABLE_CHANGES = ("data.num_workers", "train.save_every_steps", "train.output_dir",
                     "train.nan_policy", "train.nan_max_skips")


def _stage_loaders(cfg, data_cfg, train_split, test_split):
    seed = cfg.train.seed
    train_images, train_labels = train_split
    keep = subset_indices(len(train_labels), data_cfg.train_subset, (seed, TRAIN_SUBSET_STREAM),
                          "data.train_subset")
    train_set = ImageArrayDataset(train_images[keep], train_labels[keep],
                                  hflip_prob=data_cfg.hflip_prob, rotation=data_cfg.rotation,
                                  seed=seed)
    train_loader = build_loader(train_set, data_cfg.batch_size, data_cfg.num_workers, train=True)
    test_images, test_labels = test_split
    keep = subset_indices(len(test_labels), data_cfg.val_subset, (seed, VAL_SUBSET_STREAM),
                          "data.val_subset")
    return train_loader, eval_loader(test_images[keep], test_labels[keep], data_cfg)


def _fmt(value):
    """A loss for the epoch line: four decimals, or "n/a" when not measured."""
    return "n/a" if value is None else f"{value:.4f}"


def _describe_steps(stats):
    """The epoch line's gradient part: mean and largest norm, fp16 overflow steps."""
    text = ""
    if stats["grad_norm"] is not None:
        text = f" | grad norm {stats['grad_norm']:.3g} (max {stats['grad_norm_max']:.3g})"
    if stats["overflow_steps"]:
        text += f", {stats['overflow_steps']} fp16 overflow steps skipped"
    return text


def _is_better(val, best):
    """A larger validation set supersedes a subset; on the same set, higher top-1 wins."""
    if best is None:
        return True
    return (val["num_samples"], val["top1"]) > (best["val_num_samples"], best["val_top1"])


class _StopRequested(Exception):
    """Raised inside an evaluation pass to abandon it after a stop signal."""


class Trainer:
    """One training run over all stages of a config, resumable at any optimizer step."""

    def __init__(self, cfg, resume=None):
        self.cfg, self.out, self.seed = cfg, cfg.train.output_dir, cfg.train.seed
        device = select_device()
        init()
        seed_everything(self.seed)
        images, labels, _ = load_split(cfg.data, "train")
        test_images, test_labels, _ = load_split(cfg.data, "test")
        check_labels(labels, cfg.model.num_classes, "train")
        check_labels(test_labels, cfg.model.num_classes, "test")
        self.splits = ((images, labels), (test_images, test_labels))
        self.state = {"position": {"stage": 0, "epoch": 0, "micro": 0}, "epoch_index": 0,
                      "global_step": 0, "skipped_steps": 0, "best": None, "progress": None,
                      "updates": {}, "config": to_plain(cfg)}
        self.trees = {}
        if resume:
            folder = resume_folder(resume, self.out)
            self.state, self.trees = load_last(folder)
            changed = first_difference(self.state["config"], to_plain(cfg), RESUMABLE_CHANGES)
            if changed:
                raise UserError(f"the checkpoint in {folder} was trained with another config "
                                f"('{changed}' differs); resume with the same -c/-o")
            check_position(self.state, self.trees, cfg.stages, folder)
        self.precision = Precision(cfg.train.amp, device, cfg.train.amp_level)
        if "scaler" in self.trees and self.precision.scaling:
            self.precision.scaler.load_state_dict(self.trees["scaler"])
        self.model = build_model(cfg.model, load_pretrained=not resume, amp=self.precision.mode,
                                 image_size=cfg.data.image_size)
        if resume:
            load_state(self.model, self.trees["model"])
            print(f"resuming from {folder} at {self.state['position']}", flush=True)
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
        print(f"device {device}, rank {rank()} of {world_size()}; {len(labels)} train / "
              f"{len(test_labels)} val images; output in {self.out}", flush=True)
        self.logger = RunLogger(self.out, keep_records=self.state["epoch_index"],
                                enabled=is_main())
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
            print(f"best val top1 {best['val_top1']:.4f} ({best['kind']} weights, stage "
                  f"{best['stage']} epoch {best['epoch'] + 1}); weights in "
                  f"{weights_path(self.out, 'best')}", flush=True)
        return best

    def _run_stage(self, stage_index, start):
        """Build the stage's loss, loaders and optimizer; run its epochs until done or ``until``."""
        cfg, stage = self.cfg, self.cfg.stages[stage_index]
        data_cfg, loss_cfg = stage_data(cfg.data, stage), stage_loss(cfg.loss, stage)
        self.criterion = build_loss(loss_cfg)
        print(describe_stage(stage_index, stage, data_cfg, loss_cfg), flush=True)
        self.train_loader, self.val_loader = _stage_loaders(cfg, data_cfg, *self.splits)
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
        self.optimizer, self.scheduler = build_optimizer(stage, self.model, steps_per_epoch,
                                                         cfg.train, self.precision.half_weights,
                                                         self.masters.by_name)
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
        """Train, average, evaluate, log and checkpoint one epoch; True when the stage is done.

        ``resumed`` is the saved position when the epoch was interrupted after some steps.
        """
        cfg, stage, state = self.cfg, self.cfg.stages[stage_index], self.state
        epoch_index = state["epoch_index"]
        progress = EpochProgress.resumed(state["progress"]) if resumed else EpochProgress()
        set_epoch(self.train_loader, epoch_index, start=progress.micro)
        here = {"stage": stage_index, "epoch": epoch}
        # Ranks draw different dropout masks; one process keeps the key it always had.
        rank_key = (rank(),) if world_size() > 1 else ()

        def before_micro(micro):
            paddle.seed(derived_seed(self.seed, epoch_index, micro, *rank_key))

        def on_step(values, status):
            # Only applied updates count as steps: a skipped one (non-finite loss under
            # nan_policy=skip, fp16 overflow) moves neither the schedule nor the EMA.
            if status == "nonfinite":
                self._nonfinite(values, stage_index, epoch, progress)
            applied = status == "applied"
            if applied:
                self.logger.log_step(state["global_step"], values)
                if "ema" in self.averages:
                    self.averages["ema"].update(self.model, self.masters.by_path(self.optimizer))
                state["global_step"] += 1
            every = cfg.train.save_every_steps
            stop = any_rank(self.stops.requested)
            if stop or (applied and every and state["global_step"] % every == 0
                        and progress.micro < self.train_loader.batch_sampler.stop):
                self._checkpoint(dict(here, micro=progress.micro), progress.summed())
            if stop:
                raise self._interrupted(here)

        def check_stop():  # ranks cannot agree inside a pass: with several, it finishes
            if self.stops.requested and world_size() == 1:
                raise _StopRequested

        desc = f"stage {stage_index} epoch {epoch + 1}/{stage.epochs}"
        train_one_epoch(self.train_model, self.criterion, self.preprocess, self.train_loader,
                        self.optimizer, self.scheduler, progress, cfg.train.accum_steps,
                        before_micro, on_step, desc, self.precision, cfg.train.clip_grad_norm)
        stats = EpochProgress(**progress.summed()).means()
        if ("swa" in self.averages and (stage_index, epoch) >= self.swa_start
                and not (resumed and resumed.get("evaluating"))):
            self.averages["swa"].update(self.model, self.masters.by_path(self.optimizer))
        try:
            results = evaluate_kinds(self.model, self.averages, lambda: evaluate(
                self.model, self.preprocess, self.val_loader, cfg.model.num_classes, desc="val",
                check_stop=check_stop, precision=self.precision))
        except _StopRequested:
            self._checkpoint(dict(here, micro=progress.micro, evaluating=True),
                             progress.summed())
            raise self._interrupted(here) from None
        for kind, result in results.items():
            if not math.isfinite(result["loss"]):
                raise UserError(f"the {kind} weights give a non-finite validation loss at stage "
                                f"{stage_index} epoch {epoch + 1} ({result['loss']}); they are "
                                f"not saved as best: lower stages.{stage_index}.optimizer.lr or "
                                f"check train.ema / train.swa")
        val = results["raw"]
        record = {
            "stage": stage_index, "epoch": epoch, "lr": self.optimizer.get_lr(),
            "train_loss": stats["loss"], "train_ce": stats["ce"], "train_kl": stats["kl"],
            "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
            "images_per_s": stats["images_per_s"], "grad_norm": stats["grad_norm"],
            "grad_norm_max": stats["grad_norm_max"], "overflow_steps": stats["overflow_steps"],
        }
        for kind in self.averages:
            record[f"val_top1_{kind}"] = results[kind]["top1"] if kind in results else None
        self.logger.log_epoch(epoch_index, record)
        self._update_best(record, results, epoch_index)
        reached = [key for key, goal in stage.until.items()
                   if goal is not None and val[key[len("val_"):]] >= goal]
        done = bool(reached) or epoch + 1 == stage.epochs
        state["epoch_index"] += 1
        self._checkpoint({"stage": stage_index + 1, "epoch": 0, "micro": 0} if done else
                         {"stage": stage_index, "epoch": epoch + 1, "micro": 0}, None)
        print(f"{desc}: loss {_fmt(stats['loss'])} (ce {_fmt(stats['ce'])}, kl "
              f"{_fmt(stats['kl'])}) "
              f"val top1 {val['top1']:.4f} top5 {val['top5']:.4f} loss {val['loss']:.4f} "
              f"on {val['num_samples']}"
              + "".join(f", {k} top1 {results[k]['top1']:.4f}" for k in self.averages if k in results)
              + _describe_steps(stats) + f" | {stats['images_per_s']:.1f} img/s", flush=True)
        if reached:
            print(f"stage {stage_index} ends early: {', '.join(reached)} reached", flush=True)
        finished = done and stage_index == len(cfg.stages) - 1
        if any_rank(self.stops.requested) and not finished:
            raise self._interrupted(here)
        return done

    def _nonfinite(self, values, stage_index, epoch, progress):
        """Stop on a non-finite loss (or float32/bf16 gradient), or count it as skipped under
        ``train.nan_policy: skip``."""
        train = self.cfg.train
        step = progress.micro // train.accum_steps
        what = "loss" if values["grad_norm"] is None else "gradient"
        where = (f"stage {stage_index} epoch {epoch + 1} step {step} (lr {values['lr']:.3g}, "
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
                           f"{self.stops.requested or 'SIGTERM'} at stage {here['stage']} epoch "
                           f"{here['epoch'] + 1} (step {self.state['global_step']}); checkpoint "
                           f"saved in {find_last(self.out)}")

    def _update_best(self, record, results, epoch_index):
        """Keep the best of the raw, EMA and SWA weights if it beats the best so far."""
        kind = max(results, key=lambda k: (results[k]["top1"], -KINDS.index(k)))
        if _is_better(results[kind], self.state["best"]):
            self.state["best"] = dict(record, kind=kind, epoch_index=epoch_index,
                                      val_top1=results[kind]["top1"],
                                      val_num_samples=results[kind]["num_samples"])
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
                 "optimizer": portable_optimizer_state(self.model, self.optimizer)}
        trees.update({kind: avg.state_dict() for kind, avg in self.averages.items()})
        if self.precision.scaling:
            trees["scaler"] = self.precision.scaler.state_dict()
        if is_main():
            save_last(self.out, trees, self.state)


def fit(cfg, resume=None, overwrite=False):
    """Run every stage of ``cfg`` (from a checkpoint with ``resume``: True or a path),
    holding ``train.output_dir`` meanwhile; ``overwrite`` moves an earlier run there aside."""
    select_device()  # first: it also takes SIGTERM back from Paddle's C++ handler
    folder = RunFolder(cfg.train.output_dir)
    if is_main():
        folder.hold(resume=bool(resume), overwrite=overwrite)
    try:
        return Trainer(cfg, resume).fit()
    finally:
        folder.release()
