"""Declarative config schema: which keys exist, their types and defaults, and the typed view
of each section that the validated config is made of (``cfg.train`` is a
:class:`TrainConfig`: an editor completes its keys and a reader sees their types).

Recipe values (learning rates, epochs, dropout, alpha of a reproduction) live in
the YAML files under ``configs/``; the defaults here are neutral values that a
config may leave out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

REQUIRED = object()


class Node(dict):
    """A validated config mapping whose keys also read as attributes."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None
# Bounds on sizes and counts: far above any real setting, far below what exhausts a machine.
BIG = 10 ** 9
MAX_BATCH = 65_536
MAX_IMAGE_SIZE = 1024  # 4,096 tokens at patch 16: attention is quadratic in them
MIN_CROP_FRACTION = 0.25


@dataclass
class Field:
    """One leaf key: accepted Python types (one, or a tuple), default, allowed values, the
    type and count of a list's items, and the bounds of a number."""

    types: Any
    default: Any = REQUIRED
    choices: Optional[tuple] = None
    nullable: bool = False
    item_type: Any = None
    length: Optional[int] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None

    def __post_init__(self) -> None:
        self.types = self.types if isinstance(self.types, tuple) else (self.types,)


class Section:
    """A mapping of named keys, validated into a ``view`` (a :class:`Node` subclass that
    declares them with their types). ``partial`` sections only keep the keys given;
    ``optional`` ones are null (off) unless given."""

    def __init__(self, fields: dict, view: type[Node] = Node, partial: bool = False,
                 optional: bool = False) -> None:
        self.fields = fields
        self.view = view
        self.partial = partial
        self.optional = optional


class Tagged:
    """A mapping whose ``name`` key selects which of several sections applies."""

    def __init__(self, variants: dict[str, Section], default_name: Any = REQUIRED) -> None:
        self.variants = variants
        self.default_name = default_name


class ListOf:
    """A non-empty list whose items all follow one schema."""

    def __init__(self, item: Any) -> None:
        self.item = item


def _nullable(types, minimum=None, maximum=None):
    return Field(types, default=None, nullable=True, minimum=minimum, maximum=maximum)


class CropConfig(Node):
    """``data.random_resized_crop``: the area fraction and aspect ratio ranges of the crop."""

    scale: list[float]
    ratio: list[float]


class DataConfig(Node):
    """``data``: where the images come from, the validation split and subsets, batches,
    loader workers, augmentation and the evaluation view."""

    name: str
    path: Optional[str]
    train_list: str
    test_list: str
    val_list: Optional[str]
    label_names: Optional[str]
    val_split: int
    train_subset: Optional[int]
    val_subset: Optional[int]
    image_size: Optional[int]
    batch_size: int
    eval_batch_size: Optional[int]
    num_workers: int
    hflip_prob: float
    rotation: float
    train_augment: bool
    random_resized_crop: Optional[CropConfig]
    crop_fraction: float
    skip_bad_images: bool


DATA = Section({
    # The data format (:mod:`data.formats`): its choices are the formats declared there.
    "name": Field(str, "cifar100"),
    # CIFAR: the archive or its folder (null: Paddle's cache); folder and list: the data's root.
    "path": _nullable(str),
    # data.name=list: the list files (relative to data.path), the optional label-names file.
    "train_list": Field(str, "train_list.txt"),
    "test_list": Field(str, "test_list.txt"),
    "val_list": _nullable(str),
    "label_names": _nullable(str),
    # Training images held out for validation, stratified; 0: validate on the test split.
    "val_split": Field(int, 0, minimum=0, maximum=BIG),
    "train_subset": _nullable(int, minimum=1, maximum=BIG),
    "val_subset": _nullable(int, minimum=1, maximum=BIG),
    "image_size": _nullable(int, minimum=1, maximum=MAX_IMAGE_SIZE),
    "batch_size": Field(int, minimum=1, maximum=MAX_BATCH),
    "eval_batch_size": _nullable(int, minimum=1, maximum=MAX_BATCH),
    "num_workers": Field(int, 2, minimum=0, maximum=64),
    "hflip_prob": Field(float, 0.5, minimum=0.0, maximum=1.0),
    "rotation": Field(float, 0.0, minimum=0.0, maximum=180.0),
    # false: train on the images as evaluation sees them (no crop, flip or rotation; FixRes).
    "train_augment": Field(bool, True),
    # A random-resized crop of each training image (area fraction, aspect ratio); null: none.
    "random_resized_crop": Section({
        "scale": Field(list, [0.08, 1.0], item_type=float, length=2, minimum=0.0, maximum=1.0),
        "ratio": Field(list, [0.75, 4 / 3], item_type=float, length=2, minimum=0.01,
                       maximum=100.0),
    }, CropConfig, optional=True),
    # Evaluation view: the shorter side resized to image_size / crop_fraction, centre crop.
    # At least MIN_CROP_FRACTION: 0.01 would resize a photo's shorter side to 100 x 1024 px.
    "crop_fraction": Field(float, 1.0, minimum=MIN_CROP_FRACTION, maximum=1.0),
    # An unreadable image: stop (false), or warn once, count and go on without it (true).
    "skip_bad_images": Field(bool, False),
}, DataConfig)

class StageDataConfig(Node):
    """``stages.N.data``: the data settings a stage changes (only those it gives)."""

    train_subset: Optional[int]
    val_subset: Optional[int]
    hflip_prob: Optional[float]
    rotation: Optional[float]
    batch_size: Optional[int]
    image_size: Optional[int]
    train_augment: Optional[bool]


# What a stage may change in the data section.
STAGE_DATA = Section(
    {key: _nullable(DATA.fields[key].types, minimum=DATA.fields[key].minimum,
                    maximum=DATA.fields[key].maximum)
     for key in ("train_subset", "val_subset", "hflip_prob", "rotation", "batch_size",
                 "image_size", "train_augment")},
    StageDataConfig, partial=True,
)

class ModelConfig(Node):
    """``model``: the PPIM model, its weights, classes, dropout and heads, attention and
    recompute."""

    name: str
    pretrained: Union[bool, str]
    num_classes: int
    drop_rate: float
    attn_drop_rate: float
    drop_path_rate: float
    fused_attention: str
    recompute: bool
    head: str
    head_init: str
    mlp_hidden: int
    kwargs: dict


MODEL = Section({
    "name": Field(str, "deit_b_distilled_384"),
    "pretrained": Field((bool, str), True),
    "num_classes": Field(int, minimum=1, maximum=100_000),
    "drop_rate": Field(float, 0.0, minimum=0.0, maximum=1.0),
    "attn_drop_rate": Field(float, 0.0, minimum=0.0, maximum=1.0),
    "drop_path_rate": Field(float, 0.0, minimum=0.0, maximum=1.0),
    # PPIM attention through Paddle's fused kernel: auto = on a GPU with AMP.
    "fused_attention": Field(str, "auto", choices=("auto", "on", "off")),
    # Recompute each transformer block in the backward pass: less memory, more compute.
    "recompute": Field(bool, False),
    "head": Field(str, "linear", choices=("linear", "mlp")),
    # The new class heads: PPIM's initialisation, or zero (the R-Drop authors' ViT code).
    "head_init": Field(str, "default", choices=("default", "zero")),
    "mlp_hidden": Field(int, 512, minimum=1, maximum=65_536),
    "kwargs": Field(dict, {}),
}, ModelConfig)


class LossConfig(Node):
    """``loss``: R-Drop or cross-entropy, its weight alpha, the KL's reduction and form."""

    rdrop: bool
    alpha: float
    kl_reduction: str
    form: str


LOSS = Section({
    "rdrop": Field(bool, True),
    "alpha": Field(float, 5.0, minimum=0.0),
    "kl_reduction": Field(str, "batchmean", choices=("batchmean", "sum")),
    # mean: ce + alpha * kl with means; paper: the R-Drop authors' ViT objective (sums).
    "form": Field(str, "mean", choices=("mean", "paper")),
}, LossConfig)


class EmaConfig(Node):
    """``train.ema``: an exponential moving average of the weights."""

    enabled: bool
    decay: float
    warmup: bool


EMA = Section({
    "enabled": Field(bool, False),
    "decay": Field(float, 0.9998, minimum=0.0, maximum=1.0),
    "warmup": Field(bool, True),
}, EmaConfig)


class SwaConfig(Node):
    """``train.swa``: a stochastic weight average from a stage and epoch on."""

    enabled: bool
    stage: int
    start_epoch: int


SWA = Section({
    "enabled": Field(bool, False),
    "stage": Field(int, -1, minimum=-1000, maximum=1000),
    "start_epoch": Field(int, 0, minimum=0, maximum=BIG),
}, SwaConfig)


class TrainConfig(Node):
    """``train``: the output folder, seed, accumulation, precision, clipping, checkpoints and
    validations, the non-finite policy, the averages, the stage check and progress."""

    output_dir: str
    seed: int
    accum_steps: int
    lr_scaling: str
    reference_batch: Optional[int]
    amp: str
    amp_level: str
    clip_grad_norm: Optional[float]
    exclude_from_decay: bool
    save_every_steps: Optional[int]
    eval_every_steps: Optional[int]
    nan_policy: str
    nan_max_skips: int
    ema: EmaConfig
    swa: SwaConfig
    check_stages: bool
    deterministic: bool
    progress: str


TRAIN = Section({
    "output_dir": Field(str, "output"),
    "seed": Field(int, 0, minimum=0, maximum=2 ** 32 - 1),
    "accum_steps": Field(int, 1, minimum=1, maximum=MAX_BATCH),
    # Learning rates as written (none), or scaled by data.batch_size / reference_batch.
    "lr_scaling": Field(str, "none", choices=("none", "linear")),
    "reference_batch": _nullable(int, minimum=1, maximum=MAX_BATCH),
    "amp": Field(str, "off", choices=("off", "fp16", "bf16")),
    "amp_level": Field(str, "O1", choices=("O1", "O2")),
    "clip_grad_norm": _nullable(float, minimum=0.0),
    "exclude_from_decay": Field(bool, True),
    "save_every_steps": _nullable(int, minimum=1, maximum=BIG),
    # Also validate (and record) every N optimizer steps of a stage, inside epochs.
    "eval_every_steps": _nullable(int, minimum=1, maximum=BIG),
    # What a non-finite loss does: stop the run, or skip that update (at most nan_max_skips).
    "nan_policy": Field(str, "stop", choices=("stop", "skip")),
    "nan_max_skips": Field(int, 10, minimum=0, maximum=BIG),
    "ema": EMA,
    "swa": SWA,
    # Before training, one step of every stage's setup on scratch state (kernels, dtypes,
    # trainable sets, resolutions), so that a later stage's failure costs minutes, not hours.
    "check_stages": Field(bool, True),
    # Deterministic GPU kernels (cuDNN, flash attention's backward pass): bit-identical GPU
    # runs and resumes, for some speed.
    "deterministic": Field(bool, False),
    # Progress of loops: bars on a terminal or in a notebook, a line a minute in a log (auto).
    "progress": Field(str, "auto", choices=("auto", "bars", "lines", "off")),
}, TrainConfig)


class OptimizerConfig(Node):
    """``stages.N.optimizer``: the name of an optimizer of :mod:`training.optimizers` and its
    keys (each declares its own view)."""

    name: str
    lr: float


class LRScheduleConfig(Node):
    """``stages.N.lr_schedule``: the name of a schedule of :mod:`training.schedules` and its
    keys (``end_lr`` of a decay, ``power`` of a polynomial one); a key it lacks is absent."""

    name: str
    end_lr: float
    power: float


class WarmupConfig(Node):
    """``stages.N.warmup``: a linear warmup in steps or epochs from ``start_lr``."""

    steps: int
    epochs: float
    start_lr: float


WARMUP = Section({
    "steps": Field(int, 0, minimum=0, maximum=BIG),
    "epochs": Field(float, 0.0, minimum=0.0, maximum=BIG),
    "start_lr": Field(float, 0.0, minimum=0.0),
}, WarmupConfig)


class UntilConfig(Node):
    """``stages.N.until``: validation goals that end a stage early (only those given)."""

    val_top1: Optional[float]
    val_top5: Optional[float]


UNTIL = Section({
    "val_top1": Field(float, None, nullable=True, minimum=0.0, maximum=1.0),
    "val_top5": Field(float, None, nullable=True, minimum=0.0, maximum=1.0),
}, UntilConfig, partial=True)


class StageLossConfig(Node):
    """``stages.N.loss``: the loss settings a stage changes (only those it gives)."""

    alpha: Optional[float]


class StageConfig(Node):
    """One of ``stages``: its length, stop goals, optimizer, schedule, warmup, data and loss
    changes, and the parameters it trains."""

    name: Optional[str]
    epochs: Optional[int]
    steps: Optional[int]
    until: UntilConfig
    optimizer: OptimizerConfig
    lr_schedule: LRScheduleConfig
    warmup: WarmupConfig
    data: StageDataConfig
    loss: StageLossConfig
    trainable: Optional[list[str]]
    frozen_mode: str


# A stage's keys besides its optimizer and LR schedule, whose sections the registries of
# training/ declare (:func:`config_section`).
STAGE_FIELDS = {
    "name": _nullable(str),
    # How long: whole epochs, or optimizer steps (the last epoch then ends midway); one of them.
    "epochs": _nullable(int, minimum=1, maximum=BIG),
    "steps": _nullable(int, minimum=1, maximum=BIG),
    "until": UNTIL,
    "warmup": WARMUP,
    "data": STAGE_DATA,
    "loss": Section({"alpha": _nullable(float, minimum=0.0)}, StageLossConfig, partial=True),
    # Parameter-path prefixes the stage trains (e.g. [head, head_dist, norm]); null: all.
    "trainable": Field(list, None, nullable=True, item_type=str),
    # With trainable: the frozen part runs as at test time (eval: no dropout or drop path,
    # FixRes), or keeps them (train).
    "frozen_mode": Field(str, "eval", choices=("eval", "train")),
}

# Bounds of the PPIM constructor arguments that size a model (model.kwargs): generous, but a
# typo cannot ask for a model that exhausts the machine.
KWARG_BOUNDS = {
    "img_size": (int, 1, MAX_IMAGE_SIZE), "patch_size": (int, 1, MAX_IMAGE_SIZE),
    "in_chans": (int, 1, 16), "embed_dim": (int, 1, 8192), "depth": (int, 1, 128),
    "num_heads": (int, 1, 1024), "class_dim": (int, 1, 100_000), "mlp_ratio": (float, 0.0, 64.0),
    "epsilon": (float, 0.0, 1.0), "qk_scale": (float, 0.0, 1000.0), "drop_rate": (float, 0.0, 1.0),
    "attn_drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0),
}

class DistillConfig(Node):
    """``distill``: the teacher (a run folder or a PPIM model), its weights and arguments, the
    kind of distillation, its temperature and weight."""

    teacher: str
    weights: Optional[str]
    kwargs: dict
    type: str
    tau: float
    alpha: float


# Knowledge distillation into the distillation head of a DeiT distilled model; null: off.
DISTILL = Section({
    # A run folder of this project (its config.yaml and weights), or a PPIM model name.
    "teacher": Field(str),
    # Run folder: its best weights unless given; PPIM model: required, trained for these classes.
    "weights": _nullable(str),
    "kwargs": Field(dict, {}),  # a PPIM teacher's constructor arguments (as model.kwargs)
    "type": Field(str, "hard", choices=("soft", "hard")),
    "tau": Field(float, 1.0, minimum=0.01, maximum=100.0),
    "alpha": Field(float, 0.5, minimum=0.0, maximum=1.0),
}, DistillConfig, optional=True)


class Config(Node):
    """A whole validated config: the data, the model, the loss, the run-wide training
    settings, distillation (``None``: off) and the stages."""

    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    distill: Optional[DistillConfig]
    stages: list[StageConfig]


def config_section(data_formats: tuple[str, ...], optimizer: Tagged,
                   lr_schedule: Tagged) -> Section:
    """The whole config's schema, completed by what the recipe's registries declare: the
    data formats' names (``data.name``), the optimizers' and LR schedules' sections."""
    name = Field(str, DATA.fields["name"].default, choices=data_formats)
    data = Section({**DATA.fields, "name": name}, DataConfig)
    stage = Section({**STAGE_FIELDS, "optimizer": optimizer, "lr_schedule": lr_schedule},
                    StageConfig)
    return Section({
        "data": data,
        "model": MODEL,
        "loss": LOSS,
        "train": TRAIN,
        "distill": DISTILL,
        "stages": ListOf(stage),
    }, Config)
