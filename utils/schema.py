"""Declarative config schema: which keys exist, their types and defaults.

Recipe values (learning rates, epochs, dropout, alpha of a reproduction) live in
the YAML files under ``configs/``; the defaults here are neutral values that a
config may leave out.
"""

from dataclasses import dataclass
from typing import Any, Optional

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


class Section:
    """A mapping of named keys. ``partial`` sections only keep the keys given; ``optional``
    ones are null (off) unless given."""

    def __init__(self, fields: dict, partial: bool = False, optional: bool = False) -> None:
        self.fields = fields
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


DATA = Section({
    "name": Field(str, "cifar100", choices=("cifar100", "cifar10", "digits", "folder", "list")),
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
    }, optional=True),
    # Evaluation view: the shorter side resized to image_size / crop_fraction, centre crop.
    # At least MIN_CROP_FRACTION: 0.01 would resize a photo's shorter side to 100 x 1024 px.
    "crop_fraction": Field(float, 1.0, minimum=MIN_CROP_FRACTION, maximum=1.0),
    # An unreadable image: stop (false), or warn once, count and go on without it (true).
    "skip_bad_images": Field(bool, False),
})

# What a stage may change in the data section.
STAGE_DATA = Section(
    {key: _nullable(DATA.fields[key].types, minimum=DATA.fields[key].minimum,
                    maximum=DATA.fields[key].maximum)
     for key in ("train_subset", "val_subset", "hflip_prob", "rotation", "batch_size",
                 "image_size", "train_augment")},
    partial=True,
)

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
})

LOSS = Section({
    "rdrop": Field(bool, True),
    "alpha": Field(float, 5.0, minimum=0.0),
    "kl_reduction": Field(str, "batchmean", choices=("batchmean", "sum")),
    # mean: ce + alpha * kl with means; paper: the R-Drop authors' ViT objective (sums).
    "form": Field(str, "mean", choices=("mean", "paper")),
})

EMA = Section({
    "enabled": Field(bool, False),
    "decay": Field(float, 0.9998, minimum=0.0, maximum=1.0),
    "warmup": Field(bool, True),
})

SWA = Section({
    "enabled": Field(bool, False),
    "stage": Field(int, -1, minimum=-1000, maximum=1000),
    "start_epoch": Field(int, 0, minimum=0, maximum=BIG),
})

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
    # Progress of loops: bars on a terminal or in a notebook, a line a minute in a log (auto).
    "progress": Field(str, "auto", choices=("auto", "bars", "lines", "off")),
})

OPTIMIZER = Tagged({
    "AdamW": Section({
        "lr": Field(float, minimum=0.0),
        "betas": Field(list, [0.9, 0.999], item_type=float, length=2, minimum=0.0, maximum=1.0),
        "epsilon": Field(float, 1e-8, minimum=0.0),
        "weight_decay": Field(float, 0.01, minimum=0.0),
    }),
    "Momentum": Section({
        "lr": Field(float, minimum=0.0),
        "momentum": Field(float, 0.9, minimum=0.0, maximum=1.0),
        "l2_decay": Field(float, 0.0, minimum=0.0),
        "use_nesterov": Field(bool, False),
    }),
})

LR_SCHEDULE = Tagged({
    "constant": Section({}),
    "polynomial": Section({
        "end_lr": Field(float, 0.0, minimum=0.0),
        "power": Field(float, 1.0, minimum=0.0),
    }),
    "cosine": Section({
        "end_lr": Field(float, 0.0, minimum=0.0),
    }),
}, default_name="constant")

WARMUP = Section({
    "steps": Field(int, 0, minimum=0, maximum=BIG),
    "epochs": Field(float, 0.0, minimum=0.0, maximum=BIG),
    "start_lr": Field(float, 0.0, minimum=0.0),
})

UNTIL = Section({
    "val_top1": Field(float, None, nullable=True, minimum=0.0, maximum=1.0),
    "val_top5": Field(float, None, nullable=True, minimum=0.0, maximum=1.0),
}, partial=True)

STAGE = Section({
    "name": _nullable(str),
    # How long: whole epochs, or optimizer steps (the last epoch then ends midway); one of them.
    "epochs": _nullable(int, minimum=1, maximum=BIG),
    "steps": _nullable(int, minimum=1, maximum=BIG),
    "until": UNTIL,
    "optimizer": OPTIMIZER,
    "lr_schedule": LR_SCHEDULE,
    "warmup": WARMUP,
    "data": STAGE_DATA,
    "loss": Section({"alpha": _nullable(float, minimum=0.0)}, partial=True),
    # Parameter-path prefixes the stage trains (e.g. [head, head_dist, norm]); null: all.
    "trainable": Field(list, None, nullable=True, item_type=str),
    # With trainable: the frozen part runs as at test time (eval: no dropout or drop path,
    # FixRes), or keeps them (train).
    "frozen_mode": Field(str, "eval", choices=("eval", "train")),
})

# Bounds of the PPIM constructor arguments that size a model (model.kwargs): generous, but a
# typo cannot ask for a model that exhausts the machine.
KWARG_BOUNDS = {
    "img_size": (int, 1, MAX_IMAGE_SIZE), "patch_size": (int, 1, MAX_IMAGE_SIZE),
    "in_chans": (int, 1, 16), "embed_dim": (int, 1, 8192), "depth": (int, 1, 128),
    "num_heads": (int, 1, 1024), "class_dim": (int, 1, 100_000), "mlp_ratio": (float, 0.0, 64.0),
    "epsilon": (float, 0.0, 1.0), "qk_scale": (float, 0.0, 1000.0), "drop_rate": (float, 0.0, 1.0),
    "attn_drop_rate": (float, 0.0, 1.0), "drop_path_rate": (float, 0.0, 1.0),
}

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
}, optional=True)

CONFIG = Section({
    "data": DATA,
    "model": MODEL,
    "loss": LOSS,
    "train": TRAIN,
    "distill": DISTILL,
    "stages": ListOf(STAGE),
})
