"""Every stage proven before the first one trains.

A run is hours to days of GPU time in stages, and a setting or a kernel that fails only
when its stage starts loses the stages before it. So before training (and again on a
resume, for the stages still to run):

- :func:`validate_stages` checks each stage's settings against the model and the teacher
  (trainable names, image sizes against the patch, the batch split, the warmup, what
  several ranks allow), in moments;
- :func:`check_stages` runs one optimizer step of each stage's setup, as the stage will
  run it (optimizer, precision and AMP level, trainable set and frozen mode, resolution,
  loss, teacher, recompute, ranks, clipping, averages) and one evaluation batch, on the
  real device but on scratch state: a model built from the config with random weights,
  its own optimizers, loss scaler and averages, synthetic images. The random streams and
  Paddle's name counters are put back afterwards, so the run that follows is the one it
  would have been without the check.

Kernels that exist for one dtype and not another (Paddle's GPU momentum kernel and
bfloat16), fused attention, NCCL with recompute: what cannot be proven on a CPU is proven
here, on the user's machine, before the hours are spent.
"""

import contextlib
import gc
import io
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import paddle

from data.batching import micro_batch
from models.attention import AttentionTally, fused_on_capability, tallying_attention
from models.recompute import hooks_keep_random_state
from models.resolution import backbone_of, patch_size
from training.amp import Precision
from training.engine import evaluate, train_steps
from training.optim import warmup_steps
from training.optimizers import OPTIMIZERS
from training.recipe import stage_data
from training.stage import RunModel, build_stage, trainable_paths
from training.state import EpochProgress
from utils.errors import UserError, is_out_of_memory
from utils.reports.progress import silenced
from utils.runtime.device import capability_of, paddle_version
from utils.runtime.dist import world_size
from utils.runtime.seeds import preserved_random_state
from utils.schema import Config

# Images per micro-batch of a trial step (fewer when the stage's micro-batch is smaller):
# enough for every kernel, small enough to fit beside the run's own model.
TRIAL_IMAGES = 2


def validate_stages(cfg: Config, model: paddle.nn.Layer, base_size: int,
                    teacher: Optional[paddle.nn.Layer] = None, first: int = 0) -> None:
    """One :class:`UserError` naming ``stages.N`` for the first stage from ``first`` on whose
    settings cannot run with ``model`` and ``teacher``; ``base_size`` is the resolution of
    stages that set none."""
    previous, ranks = None, world_size()
    for index in range(first, len(cfg.stages)):
        stage, where = cfg.stages[index], f"stages.{index}"
        data_cfg = stage_data(cfg.data, stage)
        size = data_cfg.image_size or base_size
        for who, net in (("model", model), ("distillation teacher", teacher)):
            if net is not None and hasattr(backbone_of(net), "pos_embed") \
                    and size % patch_size(net):
                raise UserError(f"{where}: an image size of {size} px is not a multiple of the "
                                f"{who}'s patch size {patch_size(net)}; set "
                                f"{where}.data.image_size (or data.image_size) to a multiple "
                                f"of it")
        paths = trainable_paths(model, stage.trainable, index)
        micro_batch(data_cfg.batch_size, cfg.train.accum_steps, ranks, f"{where}.data.batch_size")
        try:
            warmup_steps(stage, 1)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if ranks > 1 and previous is not None and previous != (size, paths):
            raise UserError(f"{where} changes the resolution or the trained parameters "
                            f"({where}.data.image_size / .trainable), which runs on one process "
                            f"only; run the stages before it on {ranks} ranks, then resume "
                            f"without paddle.distributed.launch (--resume)")
        previous = (size, paths)


@dataclass
class StageCheck:
    """What the stage check observed: its seconds, the attention calls it counted, and
    whether the plan (``--dry-run``) assumed fused attention on this device
    (:func:`planning.plan.attention_disagreement` says how the two differ)."""

    seconds: float
    attention: AttentionTally
    planned_fused: bool


def check_stages(cfg: Config, precision: Precision, teacher: Optional[paddle.nn.Layer] = None,
                 first: int = 0, device: str = "cpu") -> StageCheck:
    """One optimizer step (two micro-batches with accumulation) and one evaluation batch of
    each stage from ``first`` on, on scratch state (see the module's text), counting which
    attention every call took; prints one line (and one more where the attention is not
    what the plan assumed). A failure is one :class:`UserError` naming the stage and what
    to change. Nothing the check built is left when it returns."""
    start = time.perf_counter()
    scratch = precision.scratch()
    with preserved_random_state(), paddle.utils.unique_name.guard(), silenced(), \
            contextlib.redirect_stdout(io.StringIO()), tallying_attention() as attention:
        net = RunModel.scratch(cfg, scratch, teacher)
        for index in range(first, len(cfg.stages)):
            try:
                _trial_step(cfg, index, net)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of the stage's setup
                raise _failure(cfg, index, exc, device, scratch) from None
        del net
        gc.collect()  # the scratch optimizers and averages: see Stage.release
    if str(device).startswith("gpu"):
        paddle.device.cuda.empty_cache()
    seconds, last = time.perf_counter() - start, len(cfg.stages) - 1
    stages = f"stage {first}" if first == last else f"stages {first}-{last}"
    mode = precision.mode if precision.mode != "off" else "float32"
    seen = f"; attention {attention.describe()}" if str(device).startswith("gpu") else ""
    print(f"stage check: {stages} each ran one optimizer step and an evaluation batch on "
          f"{device} ({mode}) on scratch weights in {seconds:.1f} s{seen} "
          f"(train.check_stages=false skips it)", flush=True)
    planned = fused_on_capability(capability_of(device), scratch.mode,
                                  cfg.model.fused_attention, paddle_version())
    return StageCheck(seconds, attention, planned)


def _trial_step(cfg: Config, index: int, net: RunModel) -> None:
    """Stage ``index``'s setup on the scratch ``net``: one optimizer step, the averages'
    update, one evaluation batch."""
    accum = min(cfg.train.accum_steps, 2)  # with accumulation: one unsynced micro-batch too
    stage = build_stage(cfg, index, net, accum_steps=accum)
    images = min(micro_batch(stage.data.batch_size, cfg.train.accum_steps, world_size()),
                 TRIAL_IMAGES)
    batches = _synthetic_batches(accum, images, stage.size, cfg.model.num_classes)
    for _ in train_steps(stage, batches, EpochProgress(), desc=f"check stage {index}"):
        for average in net.averages.values():
            average.update(net.model, net.masters.by_path(stage.optimizer))
    evaluate(net.model, stage.preprocess, batches[:1], cfg.model.num_classes, desc="check",
             precision=stage.precision)
    stage.release()


def _synthetic_batches(count, images, size, num_classes):
    """``count`` micro-batches of ``images`` uint8 ``size``-px images, as a loader yields
    them, from a generator of their own (no global random stream is drawn)."""
    rng = np.random.default_rng(0)
    return [(paddle.to_tensor(rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)),
             paddle.to_tensor(np.arange(images, dtype=np.int64) % num_classes))
            for _ in range(count)]


def _failure(cfg, index, exc, device, precision):
    """The one-line error for stage ``index``'s failed trial step, with what to change."""
    stage = cfg.stages[index]
    train = cfg.train
    mode = f"{precision.mode} {train.amp_level}" if precision.mode != "off" else "float32"
    message = " ".join(str(exc).split())[:300]
    if is_out_of_memory(exc):
        fix = (f"a step of {TRIAL_IMAGES} images does not fit beside the run's model: lower "
               f"stages.{index}.data.image_size, set model.recompute=true or use a larger GPU")
    elif precision.mode == "bf16" and train.amp_level == "O2" \
            and not OPTIMIZERS[stage.optimizer.name].gpu_bfloat16:
        others = "/".join(name for name, kind in OPTIMIZERS.items() if kind.gpu_bfloat16)
        fix = (f"Paddle's GPU {stage.optimizer.name} kernel has no bfloat16 version in some "
               f"releases, and O2 keeps the weights in bfloat16: set train.amp_level=O1 "
               f"(float32 weights), train.amp=fp16, or stages.{index}.optimizer.name={others}")
    elif cfg.model.recompute and world_size() > 1 and not hooks_keep_random_state():
        fix = ("on several CPU ranks recompute needs Paddle 3 (Paddle 2.6 keeps dropout's "
               "random state in its DataParallel-safe recompute on GPUs only): upgrade Paddle "
               "or set model.recompute=false")
    else:
        fix = ("change this stage's settings (train.amp, train.amp_level, "
               "model.fused_attention, model.recompute) and start again")
    name = stage.name or f"stage {index}"
    return UserError(f"stages.{index} ({name}) cannot train on {device} in {mode}: "
                     f"{type(exc).__name__}: {message}; {fix} (found before training: no "
                     f"stage has run in this attempt)")
