"""Declarative config schema: the typed view of each section (``cfg.train`` is a
:class:`TrainConfig`: an editor completes its keys and a reader sees their types) declares
its keys once, with their types (the annotations) and their defaults, choices and bounds
(:func:`key`); :meth:`Section.of` reads the schema that :func:`utils.config.validate`
walks from it.

Recipe values (learning rates, epochs, dropout, alpha of a reproduction) live in
the YAML files under ``configs/``; the defaults here are neutral values that a
config may leave out.
"""

from __future__ import annotations

import sys
import typing
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

REQUIRED = object()

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


def key(default: Any = REQUIRED, *, choices: Optional[tuple] = None, length: Optional[int] = None,
        minimum: Optional[float] = None, maximum: Optional[float] = None) -> Any:
    """A key of a view (``batch_size: int = key(minimum=1)``): its default (none: required),
    allowed values, a list's length, a number's (or each item's) bounds; the type is the
    annotation's (``Optional[...]``: null is allowed)."""
    return Field((), default, choices=choices, length=length, minimum=minimum, maximum=maximum)


class Node(dict):
    """A validated config mapping whose keys also read as attributes. A subclass is a
    section's view: its annotated keys declared with :func:`key` (or typed as a section) are
    the section's; ``partial=True`` keeps only the keys a config gives."""

    _declared: dict = {}
    _partial: bool = False

    def __init_subclass__(cls, partial: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._partial = partial
        cls._declared = {name: value for name, value in vars(cls).items()
                         if isinstance(value, Field)}
        for name in cls._declared:  # the values read as keys, not as these declarations
            delattr(cls, name)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


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

    @classmethod
    def of(cls, view: type[Node], optional: bool = False, **sections: Any) -> Section:
        """The section ``view`` declares: a key per annotation declared with :func:`key`,
        and a section per annotation that is a view (``Optional[...]``: off unless given;
        ``list[...]``: a non-empty list of them); ``sections`` supplies those declared
        elsewhere (the registries' tagged sections)."""
        hints = typing.get_type_hints(view, vars(sys.modules[view.__module__]))
        fields = {}
        for name, hint in hints.items():
            if name.startswith("_"):
                continue
            if name in sections:
                fields[name] = sections[name]
            elif name in view._declared:
                fields[name] = _field(hint, view._declared[name])
            else:
                inner, nullable = _unwrap(hint)
                if isinstance(inner, type) and issubclass(inner, Node):
                    fields[name] = cls.of(inner, optional=nullable)
                elif typing.get_origin(inner) is list and _is_view(typing.get_args(inner)[0]):
                    fields[name] = ListOf(cls.of(typing.get_args(inner)[0]))
        return cls(fields, view, partial=view._partial, optional=optional)


def _unwrap(hint):
    """``(type, nullable)`` of an annotation (``Optional[X]`` is ``X``, nullable)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union and type(None) in args:
        rest = tuple(arg for arg in args if arg is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return hint, False


def _is_view(hint):
    return isinstance(hint, type) and issubclass(hint, Node)


def _field(hint, declared):
    """The :class:`Field` of a key declared with ``declared`` and annotated ``hint``."""
    inner, nullable = _unwrap(hint)
    item = None
    if typing.get_origin(inner) is list:
        inner, item = list, typing.get_args(inner)[0]
    types = typing.get_args(inner) if typing.get_origin(inner) is Union else (inner,)
    return replace(declared, types=types, nullable=nullable, item_type=item)


class Tagged:
    """A mapping whose ``name`` key selects which of several sections applies."""

    def __init__(self, variants: dict[str, Section], default_name: Any = REQUIRED) -> None:
        self.variants = variants
        self.default_name = default_name


class ListOf:
    """A non-empty list whose items all follow one schema."""

    def __init__(self, item: Any) -> None:
        self.item = item


class CropConfig(Node):
    """``data.random_resized_crop``: the area fraction and aspect ratio ranges of the crop."""

    scale: list[float] = key([0.08, 1.0], length=2, minimum=0.0, maximum=1.0)
    ratio: list[float] = key([0.75, 4 / 3], length=2, minimum=0.01, maximum=100.0)


class DataConfig(Node):
    """``data``: where the images come from, the validation split and subsets, batches,
    loader workers, augmentation and the evaluation view."""

    # The data format (:mod:`data.formats`): its choices are the formats declared there.
    name: str = key("cifar100")
    # CIFAR: the archive or its folder (null: Paddle's cache); folder, list, npz: the root.
    path: Optional[str] = key(None)
    # data.name=list: the list files (relative to data.path), the optional label-names file.
    train_list: str = key("train_list.txt")
    test_list: str = key("test_list.txt")
    val_list: Optional[str] = key(None)
    label_names: Optional[str] = key(None)
    # Training images held out for validation, stratified; 0: validate on the test split.
    val_split: int = key(0, minimum=0, maximum=BIG)
    train_subset: Optional[int] = key(None, minimum=1, maximum=BIG)
    val_subset: Optional[int] = key(None, minimum=1, maximum=BIG)
    image_size: Optional[int] = key(None, minimum=1, maximum=MAX_IMAGE_SIZE)
    batch_size: int = key(minimum=1, maximum=MAX_BATCH)
    eval_batch_size: Optional[int] = key(None, minimum=1, maximum=MAX_BATCH)
    num_workers: int = key(2, minimum=0, maximum=64)
    hflip_prob: float = key(0.5, minimum=0.0, maximum=1.0)
    rotation: float = key(0.0, minimum=0.0, maximum=180.0)
    # false: train on the images as evaluation sees them (no crop, flip or rotation; FixRes).
    train_augment: bool = key(True)
    # A random-resized crop of each training image (area fraction, aspect ratio); null: none.
    random_resized_crop: Optional[CropConfig]
    # Evaluation view: the shorter side resized to image_size / crop_fraction, centre crop.
    # At least MIN_CROP_FRACTION: 0.01 would resize a photo's shorter side to 100 x 1024 px.
    crop_fraction: float = key(1.0, minimum=MIN_CROP_FRACTION, maximum=1.0)
    # An unreadable image: stop (false), or warn once, count and go on without it (true).
    skip_bad_images: bool = key(False)


def _as_data(name: str) -> Field:
    """A stage's change of ``data.<name>``: the same bounds, unset unless given."""
    return replace(DataConfig._declared[name], default=None)


class StageDataConfig(Node, partial=True):
    """``stages.N.data``: the data settings a stage changes (only those it gives)."""

    train_subset: Optional[int] = _as_data("train_subset")
    val_subset: Optional[int] = _as_data("val_subset")
    hflip_prob: Optional[float] = _as_data("hflip_prob")
    rotation: Optional[float] = _as_data("rotation")
    batch_size: Optional[int] = _as_data("batch_size")
    image_size: Optional[int] = _as_data("image_size")
    train_augment: Optional[bool] = _as_data("train_augment")


class ModelConfig(Node):
    """``model``: the PPIM model, its weights, classes, dropout and heads, attention and
    recompute."""

    name: str = key("deit_b_distilled_384")
    pretrained: Union[bool, str] = key(True)
    num_classes: int = key(minimum=1, maximum=100_000)
    drop_rate: float = key(0.0, minimum=0.0, maximum=1.0)
    attn_drop_rate: float = key(0.0, minimum=0.0, maximum=1.0)
    drop_path_rate: float = key(0.0, minimum=0.0, maximum=1.0)
    # PPIM attention through Paddle's fused kernel: auto = on a GPU with AMP.
    fused_attention: str = key("auto", choices=("auto", "on", "off"))
    # Recompute each transformer block in the backward pass: less memory, more compute.
    recompute: bool = key(False)
    head: str = key("linear", choices=("linear", "mlp"))
    # The new class heads: PPIM's initialisation, or zero (the R-Drop authors' ViT code).
    head_init: str = key("default", choices=("default", "zero"))
    mlp_hidden: int = key(512, minimum=1, maximum=65_536)
    kwargs: dict = key({})


class LossConfig(Node):
    """``loss``: R-Drop or cross-entropy, its weight alpha, the KL's reduction and form."""

    rdrop: bool = key(True)
    alpha: float = key(5.0, minimum=0.0)
    kl_reduction: str = key("batchmean", choices=("batchmean", "sum"))
    # mean: ce + alpha * kl with means; paper: the R-Drop authors' ViT objective (sums).
    form: str = key("mean", choices=("mean", "paper"))


class EmaConfig(Node):
    """``train.ema``: an exponential moving average of the weights."""

    enabled: bool = key(False)
    decay: float = key(0.9998, minimum=0.0, maximum=1.0)
    warmup: bool = key(True)


class SwaConfig(Node):
    """``train.swa``: a stochastic weight average from a stage and epoch on."""

    enabled: bool = key(False)
    stage: int = key(-1, minimum=-1000, maximum=1000)
    start_epoch: int = key(0, minimum=0, maximum=BIG)


class TrainConfig(Node):
    """``train``: the output folder, seed, accumulation, precision, clipping, checkpoints and
    validations, the non-finite policy, the averages, the stage check and progress."""

    output_dir: str = key("output")
    seed: int = key(0, minimum=0, maximum=2 ** 32 - 1)
    accum_steps: int = key(1, minimum=1, maximum=MAX_BATCH)
    # Learning rates as written (none), or scaled by data.batch_size / reference_batch.
    lr_scaling: str = key("none", choices=("none", "linear"))
    reference_batch: Optional[int] = key(None, minimum=1, maximum=MAX_BATCH)
    amp: str = key("off", choices=("off", "fp16", "bf16"))
    amp_level: str = key("O1", choices=("O1", "O2"))
    clip_grad_norm: Optional[float] = key(None, minimum=0.0)
    exclude_from_decay: bool = key(True)
    save_every_steps: Optional[int] = key(None, minimum=1, maximum=BIG)
    # Also validate (and record) every N optimizer steps of a stage, inside epochs.
    eval_every_steps: Optional[int] = key(None, minimum=1, maximum=BIG)
    # What a non-finite loss does: stop the run, or skip that update (at most nan_max_skips).
    nan_policy: str = key("stop", choices=("stop", "skip"))
    nan_max_skips: int = key(10, minimum=0, maximum=BIG)
    ema: EmaConfig
    swa: SwaConfig
    # Before training, one step of every stage's setup on scratch state (kernels, dtypes,
    # trainable sets, resolutions), so that a later stage's failure costs minutes, not hours.
    check_stages: bool = key(True)
    # Deterministic GPU kernels (cuDNN, flash attention's backward pass): bit-identical GPU
    # runs and resumes, for some speed.
    deterministic: bool = key(False)
    # Progress of loops: bars on a terminal or in a notebook, a line a minute in a log (auto).
    progress: str = key("auto", choices=("auto", "bars", "lines", "off"))


class OptimizerConfig(Node):
    """``stages.N.optimizer``: the name of an optimizer of :mod:`training.optimizers` and its
    keys (each declares its own view)."""

    name: str
    lr: float


class LRScheduleConfig(Node):
    """``stages.N.lr_schedule``: the name of a schedule of :mod:`training.schedules` and its
    keys (each declares its own view)."""

    name: str


class WarmupConfig(Node):
    """``stages.N.warmup``: a linear warmup in steps or epochs from ``start_lr``."""

    steps: int = key(0, minimum=0, maximum=BIG)
    epochs: float = key(0.0, minimum=0.0, maximum=BIG)
    start_lr: float = key(0.0, minimum=0.0)


class UntilConfig(Node, partial=True):
    """``stages.N.until``: validation goals that end a stage early (only those given)."""

    val_top1: Optional[float] = key(None, minimum=0.0, maximum=1.0)
    val_top5: Optional[float] = key(None, minimum=0.0, maximum=1.0)


class StageLossConfig(Node, partial=True):
    """``stages.N.loss``: the loss settings a stage changes (only those it gives)."""

    alpha: Optional[float] = key(None, minimum=0.0)


class StageConfig(Node):
    """One of ``stages``: its length, stop goals, optimizer, schedule, warmup, data and loss
    changes, and the parameters it trains (the optimizer's and the schedule's sections are
    the registries' of training/: :func:`config_section`)."""

    name: Optional[str] = key(None)
    # How long: whole epochs, or optimizer steps (the last epoch then ends midway); one of them.
    epochs: Optional[int] = key(None, minimum=1, maximum=BIG)
    steps: Optional[int] = key(None, minimum=1, maximum=BIG)
    until: UntilConfig
    optimizer: OptimizerConfig
    lr_schedule: LRScheduleConfig
    warmup: WarmupConfig
    data: StageDataConfig
    loss: StageLossConfig
    # Parameter-path prefixes the stage trains (e.g. [head, head_dist, norm]); null: all.
    trainable: Optional[list[str]] = key(None)
    # With trainable: the frozen part runs as at test time (eval: no dropout or drop path,
    # FixRes), or keeps them (train).
    frozen_mode: str = key("eval", choices=("eval", "train"))


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

    # A run folder of this project (its config.yaml and weights), or a PPIM model name.
    teacher: str = key()
    # Run folder: its best weights unless given; PPIM model: required, trained for these classes.
    weights: Optional[str] = key(None)
    kwargs: dict = key({})  # a PPIM teacher's constructor arguments (as model.kwargs)
    type: str = key("hard", choices=("soft", "hard"))
    tau: float = key(1.0, minimum=0.01, maximum=100.0)
    alpha: float = key(0.5, minimum=0.0, maximum=1.0)


class Config(Node):
    """A whole validated config: the data, the model, the loss, the run-wide training
    settings, distillation (``None``: off; knowledge distillation into the distillation head
    of a DeiT distilled model) and the stages."""

    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    distill: Optional[DistillConfig]
    stages: list[StageConfig]


# The sections a part of the project validates on its own (a PPIM teacher's model section).
MODEL = Section.of(ModelConfig)


def config_section(data_formats: tuple[str, ...], optimizer: Tagged,
                   lr_schedule: Tagged) -> Section:
    """The whole config's schema, completed by what the recipe's registries declare: the
    data formats' names (``data.name``), the optimizers' and LR schedules' sections."""
    data = Section.of(DataConfig)
    data.fields["name"] = replace(data.fields["name"], choices=data_formats)
    stage = Section.of(StageConfig, optimizer=optimizer, lr_schedule=lr_schedule)
    return Section.of(Config, data=data, stages=ListOf(stage))
