"""The stage plan: per-stage overrides of the data and loss sections, the batch arithmetic,
and its description."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from data.batching import micro_batch
from training.optimizers import OPTIMIZERS
from training.schedules import SCHEDULES
from utils.errors import UserError
from utils.schema import Config, DataConfig, LossConfig, StageConfig, TrainConfig

if TYPE_CHECKING:
    from training.state import Position


@dataclass(frozen=True)
class StageLength:
    """How long a stage trains: ``steps`` optimizer steps of ``accum_steps`` micro-batches,
    ``steps_per_epoch`` per epoch; a budget in steps ends inside its last epoch."""

    steps_per_epoch: int
    steps: int
    accum_steps: int = 1

    @classmethod
    def of(cls, stage: StageConfig, steps_per_epoch: int, accum_steps: int = 1) -> StageLength:
        """The length of ``stage`` (``epochs:`` or ``steps:``) at ``steps_per_epoch``."""
        return cls(steps_per_epoch, stage.steps or stage.epochs * steps_per_epoch, accum_steps)

    @classmethod
    def measured(cls, index: int, stage: StageConfig, sampler: Any,
                 accum_steps: int) -> StageLength:
        """The length of stage ``index`` at the epoch its training ``sampler`` yields; one
        error for an epoch shorter than one accumulation."""
        steps_per_epoch = sampler.full_length() // accum_steps
        if steps_per_epoch == 0:
            raise UserError(f"stage {index}: fewer batches per epoch than "
                            f"train.accum_steps={accum_steps}")
        return cls.of(stage, steps_per_epoch, accum_steps)

    def check_start(self, index: int, start: Position) -> None:
        """One error for a resume ``start`` (a :class:`training.state.Position`) outside
        stage ``index`` of this length."""
        if not (start.epoch < self.epochs and 0 <= start.micro <= self.window(start.epoch)):
            raise UserError(f"the checkpoint's position (epoch {start.epoch + 1}, micro-batch "
                            f"{start.micro} of stage {index}) lies outside the stage; it is "
                            f"damaged: resume from another copy or start again")

    @property
    def epochs(self) -> int:
        """Epochs the stage starts (the last one possibly cut short)."""
        return math.ceil(self.steps / self.steps_per_epoch)

    def window(self, epoch: int) -> int:
        """Micro-batches epoch ``epoch`` (from 0) trains on: whole accumulations, and the
        rest of a budget in steps in the last epoch."""
        return min(self.steps_per_epoch, self.steps - epoch * self.steps_per_epoch) \
            * self.accum_steps

    def ends_epoch(self, epoch: int, micro: int) -> bool:
        """Whether micro-batch ``micro`` is the end of epoch ``epoch``'s window."""
        return micro == self.window(epoch)

    def step_at(self, epoch: int, micro: int) -> int:
        """Optimizer steps of the stage done at micro-batch ``micro`` of epoch ``epoch``
        (skipped steps included: they used their batches)."""
        return epoch * self.steps_per_epoch + micro // self.accum_steps

    def eval_due(self, epoch: int, micro: int, every: int) -> bool:
        """Whether a validation every ``every`` steps falls at ``micro``, inside the epoch
        (its end is validated anyway)."""
        return bool(every) and not self.ends_epoch(epoch, micro) \
            and self.step_at(epoch, micro) % every == 0


def lr_scale(train_cfg: TrainConfig, batch_size: int) -> float:
    """The factor on a stage's learning rates: ``batch_size / train.reference_batch`` with
    ``train.lr_scaling: linear``, else 1."""
    if train_cfg.lr_scaling == "linear":
        return batch_size / train_cfg.reference_batch
    return 1.0


def describe_stage(cfg: Config, index: int, image_size: int) -> str:
    """One line of the stage plan of stage ``index``: epochs, stop condition, optimizer, LR,
    decay, data at ``image_size`` pixels, the loss and whether a teacher takes part."""
    stage, distill_cfg = cfg.stages[index], cfg.distill
    data_cfg, loss_cfg = stage_data(cfg.data, stage), stage_loss(cfg.loss, stage)
    opt_text = OPTIMIZERS[stage.optimizer.name].describe(stage.optimizer)
    sched_text = SCHEDULES[stage.lr_schedule.name].describe(stage.lr_schedule)
    if stage.warmup.steps or stage.warmup.epochs:
        length = (f"{stage.warmup.steps} steps" if stage.warmup.steps
                  else f"{stage.warmup.epochs:g} epochs")
        sched_text += f" after {length} of linear warmup from {stage.warmup.start_lr:g}"
    until = " or ".join(f"{key} >= {value:g}" for key, value in stage.until.items()
                        if value is not None)

    def size(n: Optional[int]) -> str:
        return "all" if n is None else str(n)

    crop = data_cfg.get("random_resized_crop")
    if data_cfg.get("train_augment", True):
        augment = f"hflip p={data_cfg.hflip_prob:g}, rotation ±{data_cfg.rotation:g}°"
        if crop:
            augment += (f", random-resized crop scale {crop.scale[0]:g}-{crop.scale[1]:g} ratio "
                        f"{crop.ratio[0]:.3g}-{crop.ratio[1]:.3g}")
    else:
        augment = "test-time preprocessing (no crop, flip or rotation)"
    data_text = (f"train {size(data_cfg.train_subset)} / val {size(data_cfg.val_subset)} images "
                 f"at {image_size} px, {data_cfg.batch_size} images per step, {augment}")
    loss_text = f"R-Drop alpha={loss_cfg.alpha:g}" if loss_cfg.rdrop else "cross-entropy"
    if loss_cfg.rdrop and loss_cfg.form == "paper":
        loss_text += (" in the paper's form: ce1 + ce2 + alpha x (KL(p1||p2) + KL(p2||p1)) "
                      "summed over batch and classes")
    loss_text += (f"; distillation from {distill_cfg.teacher} ({distill_cfg.type}, "
                  f"alpha={distill_cfg.alpha:g})" if distill_cfg else "; no distillation")
    if stage.trainable is not None:
        loss_text += (f"; trains {', '.join(stage.trainable)} only, the frozen layers "
                      + ("as at test time" if stage.frozen_mode == "eval"
                         else "with their dropout"))
    name = stage.name or f"stage {index}"
    length = f"{stage.steps} optimizer steps" if stage.steps else f"{stage.epochs} epoch(s)"
    epochs = f"up to {length} until {until}" if until else length
    return f"[{index}] {name}: {epochs}; {opt_text}; {sched_text}; {data_text}; {loss_text}"


def describe_run(cfg: Config) -> str:
    """One line of the run-wide training settings: batch, accumulation, clipping, precision,
    averages."""
    from data.dataset import validation_source  # it loads Paddle, which --help does not need

    train = cfg.train
    batch, accum = cfg.data.batch_size, train.accum_steps
    validation = {
        "held_out": f"validation on {cfg.data.val_split} held-out training images, the test "
                    f"split once at the end",
        "own": "validation on the data's own split (val/ or data.val_list), the test split "
               "once at the end",
        "test": "validation on the test split (data.val_split: 0; best chosen on it)"}
    parts = [validation[validation_source(cfg.data)],
             f"{batch} images per optimizer step (data.batch_size, all ranks): micro-batches of "
             f"{batch} / (ranks x {accum}) per rank, "
             f"{micro_batch(batch, accum, 1)} on one process",
             f"clip global norm {train.clip_grad_norm:g}" if train.clip_grad_norm else "no clipping",
             "no decay on biases/norms/pos_embed/tokens" if train.exclude_from_decay
             else "decay on every parameter",
             f"AMP {train.amp} ({train.amp_level})" if train.amp != "off" else "float32",
             f"fused attention {cfg.model.fused_attention}"]
    if train.ema.enabled:
        parts.append(f"EMA decay {train.ema.decay:g}" + (" with warm-up" if train.ema.warmup else ""))
    if train.swa.enabled:
        parts.append(f"SWA from stage {train.swa.stage % len(cfg.stages)} "
                     f"epoch {train.swa.start_epoch + 1}")
    if train.lr_scaling == "linear":
        parts.append(f"learning rates scaled by data.batch_size / {train.reference_batch}")
    if train.save_every_steps:
        parts.append(f"checkpoint every {train.save_every_steps} steps")
    if train.eval_every_steps:
        parts.append(f"validation also every {train.eval_every_steps} steps of a stage")
    if cfg.distill:
        distill = cfg.distill
        kind = ("hard (the teacher's top class)" if distill.type == "hard"
                else f"soft (temperature {distill.tau:g})")
        parts.append(f"distillation from {distill.teacher} into the distillation head: {kind}, "
                     f"weight {distill.alpha:g} (the class head's loss {1 - distill.alpha:g})")
    return "; ".join(parts)


def stage_data(data_cfg: DataConfig, stage: StageConfig) -> DataConfig:
    """The data section with the stage's overrides applied."""
    merged = type(data_cfg)(data_cfg)
    merged.update(stage.data)
    return merged


def final_image_size(cfg: Config) -> Optional[int]:
    """The resolution the trained weights are evaluated at: the last stage's
    ``data.image_size`` (``None``: the model's own)."""
    return stage_data(cfg.data, cfg.stages[-1]).image_size


def stage_loss(loss_cfg: LossConfig, stage: StageConfig) -> LossConfig:
    """The loss section with the stage's overrides (those not null) applied."""
    merged = type(loss_cfg)(loss_cfg)
    merged.update({key: value for key, value in stage.loss.items() if value is not None})
    return merged
