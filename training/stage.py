"""A stage's setup, built in one place for training, the stage check and preflight alike.

The run holds one :class:`RunModel`: the model, its AMP O2 master copies, its weight
averages and a distillation teacher. A stage is a view of it: the resolution it runs at,
the parameters it trains (with the frozen ones as at test time), the DataParallel wrapper
with ranks, and the stage's own data, loss, optimizer and LR schedule
(:func:`build_stage`). What a stage built is released when it ends (:meth:`Stage.release`).

A FixRes stage (a few epochs of the head at the test resolution) changes both the
resolution and the trained set. The position embedding is resampled
(:mod:`models.resolution`) in the model and, so that they stay loadable into it, in the
weight averages and AMP O2's float32 master copy, which is where the model's own
half-precision embedding is resampled from.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import paddle

from data.dataset import stage_loaders
from data.preprocess import DevicePreprocess
from data.sources import Split
from losses import build_loss
from models.build import build_model, input_size
from models.frozen import train_mode
from models.resolution import backbone_of, fit_resolution, resolution_of, set_resolution
from training.amp import Precision
from training.averaging import WeightAverage, build_averages
from training.optim import MasterCopies, build_optimizer, master_named
from training.recipe import StageLength, lr_scale, stage_data, stage_loss
from training.teacher import build_teacher
from utils.errors import UserError
from utils.io.tensor_io import as_paddle, load_state
from utils.runtime.dist import world_size, wrap
from utils.schema import Config, DataConfig, LossConfig, StageConfig


@dataclass
class RunModel:
    """What every stage of a run trains or uses: the ``model``, its float32 ``masters``
    (AMP O2), its weight ``averages`` (EMA, SWA), a distillation ``teacher``, the
    resolution ``base_size`` of stages that set none, and ``wrapped``, the model as the
    last stage trained it (a DataParallel with ranks)."""

    model: paddle.nn.Layer
    precision: Precision
    masters: MasterCopies
    averages: dict[str, WeightAverage]
    base_size: int
    teacher: Optional[paddle.nn.Layer] = None
    wrapped: Optional[paddle.nn.Layer] = None

    @classmethod
    def for_run(cls, cfg: Config, precision: Precision, restored: Optional[dict] = None,
                updates: Optional[dict] = None) -> RunModel:
        """The run's model with its pretrained weights, or with a checkpoint's tensors
        ``restored`` (at the checkpoint's resolution) and its averages' ``updates``
        counts; the loss scaler's state restored with them; the teacher ``cfg.distill``
        names."""
        restored = restored or {}
        if "scaler" in restored and precision.scaling:
            precision.scaler.load_state_dict(restored["scaler"])
        model = build_model(cfg.model, load_pretrained=not restored, amp=precision.mode,
                            image_size=cfg.data.image_size, two_heads=cfg.distill is not None)
        base_size = input_size(model)
        if restored:
            set_resolution(model, resolution_of(restored["raw"], model))
            load_state(model, restored["raw"])
        masters = MasterCopies(model, precision,  # casts the weights for O2
                               as_paddle(restored["optimizer"]) if restored else None)
        teacher = (build_teacher(cfg.distill, cfg.model.num_classes, precision)
                   if cfg.distill else None)
        averages = build_averages(cfg.train, model, updates, restored, masters.by_path())
        return cls(model, precision, masters, averages, base_size, teacher)

    @classmethod
    def scratch(cls, cfg: Config, precision: Precision,
                teacher: Optional[paddle.nn.Layer] = None) -> RunModel:
        """A model of ``cfg`` with random weights and averages of its own, beside the
        run's (the stage check); it shares the run's ``teacher``."""
        model = build_model(cfg.model, load_pretrained=False, amp=precision.mode,
                            image_size=cfg.data.image_size, two_heads=cfg.distill is not None)
        masters = MasterCopies(model, precision)
        return cls(model, precision, masters, build_averages(cfg.train, model),
                   input_size(model), teacher)


@dataclass
class Stage:
    """One stage as it trains: the model view (``model``: the model or its DataParallel,
    ``preprocess`` at ``size`` pixels), its loss ``criterion``, ``optimizer`` and LR
    ``scheduler`` (``None`` for a constant LR), the ``length`` it trains for and its
    loaders (``None`` in the stage check). ``net`` is the run's model it is a view of."""

    index: int
    config: StageConfig
    data: DataConfig
    loss: LossConfig
    size: int
    net: RunModel
    model: paddle.nn.Layer
    preprocess: DevicePreprocess
    criterion: paddle.nn.Layer
    optimizer: paddle.optimizer.Optimizer
    scheduler: Optional[paddle.optimizer.lr.LRScheduler]
    length: StageLength
    clip_norm: Optional[float] = None
    train_loader: Optional[paddle.io.DataLoader] = None
    val_loader: Optional[paddle.io.DataLoader] = None
    released: bool = field(default=False, repr=False)

    @classmethod
    def of_parts(cls, model: paddle.nn.Layer, criterion: Callable,
                 optimizer: Optional[paddle.optimizer.Optimizer] = None, size: int = 32,
                 **options: Any) -> Stage:
        """A stage of a model built by hand (tests, benchmarks): ``model`` trained with
        ``criterion`` and ``optimizer`` at ``size`` pixels; ``options`` are ``scheduler``,
        ``precision``, ``accum_steps``, ``clip_norm`` and ``teacher``."""
        precision = options.get("precision") or Precision()
        net = RunModel(model, precision, None, {}, size, options.get("teacher"))
        length = StageLength(1, 1, options.get("accum_steps", 1))
        return cls(index=0, config=StageConfig(frozen_mode="eval"), data=DataConfig(),
                   loss=LossConfig(),
                   size=size, net=net, model=model, preprocess=DevicePreprocess(size),
                   criterion=criterion, optimizer=optimizer,
                   scheduler=options.get("scheduler"), length=length,
                   clip_norm=options.get("clip_norm"))

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.length.accum_steps

    @property
    def frozen_eval(self) -> bool:
        """Whether the frozen parameters' layers run as at test time."""
        return self.config.frozen_mode == "eval"

    @property
    def precision(self) -> Precision:
        """The run's precision and loss scaler."""
        return self.net.precision

    @property
    def teacher(self) -> Optional[paddle.nn.Layer]:
        """The distillation teacher, or ``None``."""
        return self.net.teacher

    def release(self) -> None:
        """End the stage: hand its optimizer's master copies to the next stage and free its
        gradients, optimizer, schedule, loss and loaders. Paddle's optimizers sit in a
        reference cycle (``self.clear_gradients = self.clear_grad``), so only the cyclic
        garbage collector frees them and their moments: it runs here."""
        if self.released:
            return
        self.net.masters.carry(self.optimizer)
        # clear_grad() leaves zero-filled gradients allocated: a parameter the next stage
        # freezes would hold its gradient's memory through that stage.
        for param in self.net.model.parameters():
            param.clear_gradient(False)
        self.optimizer = self.scheduler = self.criterion = None
        self.train_loader = self.val_loader = None
        self.released = True
        gc.collect()
        if paddle.device.is_compiled_with_cuda() and \
                str(paddle.get_device()).startswith("gpu"):
            paddle.device.cuda.empty_cache()


def build_stage(cfg: Config, index: int, net: RunModel, splits: Optional[tuple[Split, Split]] = None,
                accum_steps: Optional[int] = None) -> Stage:
    """Stage ``index`` of ``cfg`` set up on ``net``: the model at the stage's resolution
    with its trained set, then the loaders over ``splits`` (train, val) and the length they
    give (without ``splits``, one optimizer step an epoch: the stage check), the optimizer
    and schedule, and the loss. ``accum_steps`` replaces ``train.accum_steps`` (preflight's
    smaller micro-batches, the check's two)."""
    stage = cfg.stages[index]
    data_cfg, loss_cfg = stage_data(cfg.data, stage), stage_loss(cfg.loss, stage)
    accum = accum_steps or cfg.train.accum_steps
    size = data_cfg.image_size or net.base_size
    model, preprocess = model_view(net, index, stage, size)
    train_loader = val_loader = None
    if splits is not None:
        train_loader, val_loader = stage_loaders(data_cfg, cfg.train.seed, accum, size, *splits)
        length = StageLength.measured(index, stage, train_loader.batch_sampler, accum)
    else:
        length = StageLength.of(stage, 1, accum)
    optimizer, scheduler = build_optimizer(
        stage, net.model, length.steps_per_epoch, cfg.train,
        master_weights=net.precision.half_weights, masters=net.masters.by_name,
        lr_scale=lr_scale(cfg.train, data_cfg.batch_size))
    criterion = build_loss(loss_cfg, cfg.distill)
    return Stage(index=index, config=stage, data=data_cfg, loss=loss_cfg, size=size, net=net,
                 model=model, preprocess=preprocess, criterion=criterion, optimizer=optimizer,
                 scheduler=scheduler, length=length, clip_norm=cfg.train.clip_grad_norm,
                 train_loader=train_loader, val_loader=val_loader)


def model_view(net: RunModel, index: int, stage: StageConfig,
                size: int) -> tuple[paddle.nn.Layer, DevicePreprocess]:
    """Set ``net.model`` up for stage ``index``: its resolution ``size`` and the parameters
    ``stage.trainable`` names. Returns the model to train and the device preprocessing for
    ``size``. With ranks the model trains inside a DataParallel, which syncs the parameters
    that train when it is built: the previous stage's is kept while they stay the same; a
    stage that changes them is refused with ranks, as Paddle crashes on a second
    DataParallel of one model."""
    model = net.model
    before = {path for path, param in model.named_parameters() if not param.stop_gradient}
    changed = change_resolution(net, size)
    trained, total = set_trainable(model, stage.trainable, index)
    if stage.trainable is not None:
        print(f"stage {index} trains {trained} of {total} parameter tensors "
              f"({', '.join(stage.trainable)}); the others are frozen; "
              + frozen_line(model, stage.frozen_mode), flush=True)
    after = {path for path, param in model.named_parameters() if not param.stop_gradient}
    if net.wrapped is None or changed or before != after:
        if net.wrapped is not None and world_size() > 1:
            raise UserError(f"stage {index} changes the resolution or the trained parameters "
                            f"(stages.{index}.data.image_size / .trainable), which runs on one "
                            f"process only; run it without paddle.distributed.launch (resume "
                            f"the run there with --resume)")
        net.wrapped = wrap(model)
    return net.wrapped, DevicePreprocess(size)


def change_resolution(net: RunModel, size: int) -> bool:
    """Make ``net.model`` (and the teacher, when it is a ViT) run at ``size × size``;
    resample the position embedding of each average and of the master copies. True when
    the size changed."""
    model, teacher, masters = net.model, net.teacher, net.masters
    if teacher is not None and hasattr(backbone_of(teacher), "pos_embed"):
        # From the teacher's own embedding each time: resampling a resampled one would
        # blur it a little more at every change (and make a stage check leave a trace).
        set_resolution(teacher, size, getattr(teacher, "native_pos_embed", None))
    if input_size(model) == size:
        return False
    old = backbone_of(model).pos_embed
    master = masters.by_name.pop(old.name, None)
    resampled = set_resolution(model, size, None if master is None else master.numpy())
    if master is not None:
        new = backbone_of(model).pos_embed
        masters.by_name[new.name] = master_named(new.name, paddle.to_tensor(resampled))
    for average in net.averages.values():
        average.average = fit_resolution(average.average, model)
    return True


def trainable_paths(model: paddle.nn.Layer, prefixes: Optional[list[str]],
                    stage_index: int) -> set[str]:
    """The state-dict paths of the parameters a stage trains: each of ``prefixes`` names a
    parameter (``head.bias``) or lies above some (``head`` covers ``head.weight`` and
    ``head.bias``); all when ``prefixes`` is ``None``. One error naming
    ``stages.<stage_index>.trainable`` for a prefix that names none."""
    params = [path for path, _ in model.named_parameters()]
    if prefixes is None:
        return set(params)
    unmatched = [p for p in prefixes
                 if not any(path == p or path.startswith(p + ".") for path in params)]
    if unmatched:
        tops = sorted({".".join(path.split(".")[:2 if path.startswith("backbone.") else 1])
                       for path in params})
        raise UserError(f"config key 'stages.{stage_index}.trainable': {unmatched[0]!r} "
                        f"names no parameter of this model; its layers include "
                        f"{', '.join(tops[:12])}")
    return {path for path in params if any(path == p or path.startswith(p + ".")
                                           for p in prefixes)}


def set_trainable(model: paddle.nn.Layer, prefixes: Optional[list[str]],
                  stage_index: int) -> tuple[int, int]:
    """Train the parameters :func:`trainable_paths` chooses, freeze the others. Returns
    ``(trained, total)`` parameter counts."""
    chosen = trainable_paths(model, prefixes, stage_index)
    params = dict(model.named_parameters())
    for path, param in params.items():
        param.stop_gradient = path not in chosen
    return len(chosen), len(params)


def random_layers(model: paddle.nn.Layer) -> list[paddle.nn.Layer]:
    """The layers that draw random numbers in the model's current mode (dropout and drop
    path with a rate above 0, in training mode)."""
    return [layer for layer in model.sublayers() if layer.training and (
        (isinstance(layer, paddle.nn.Dropout) and layer.p > 0)
        or getattr(layer, "drop_prob", 0) > 0)]


def frozen_line(model: paddle.nn.Layer, frozen_mode: str) -> str:
    """What a stage with frozen parameters does with their dropout, and what R-Drop then
    compares (its two copies differ only through the random layers still on)."""
    train_mode(model, frozen_mode == "eval")
    active = len(random_layers(model))
    if frozen_mode == "train":
        where = "the frozen layers keep dropout and drop path (frozen_mode: train)"
    else:
        where = "the frozen layers run as at test time (no dropout or drop path)"
    if active:
        rdrop = f"R-Drop's two copies differ through the {active} dropout layers left on"
    else:
        rdrop = ("no dropout is left on, so R-Drop's two copies are the same: its KL term is "
                 "0 and the stage trains on the cross-entropy")
    return f"{where}; {rdrop}"
