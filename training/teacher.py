"""The teacher of knowledge distillation: a run of this project, or a PPIM model with weights."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from models.build import build_model, describe_load, load_weights, ppim_constructor
from models.resolution import backbone_of
from training.trained import load_trained
from utils.errors import UserError
from utils.io.files import file_digest, path_problem
from utils.run_folder import folder_in_use

if TYPE_CHECKING:
    import paddle

    from training.amp import Precision
    from utils.schema import DistillConfig


def _run_teacher(folder, distill_cfg, precision):
    """The best (or ``distill.weights``) weights of the run in ``folder``, built from the
    run's own config."""
    from training.config import load_config
    from utils.checkpoint import weights_path

    if folder_in_use(folder):
        raise UserError(f"distill.teacher {folder} is the output folder of a run that is still "
                        f"going (its run.lock is held): its best weights may change under this "
                        f"run; let it finish, or copy its best.safetensors and name it with "
                        f"distill.weights")
    config_path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config_path):
        raise UserError(f"distill.teacher {folder} is a folder without config.yaml; name the "
                        f"output folder of a finished run of main.py, or a PPIM model name")
    cfg = load_config(config_path)
    cfg.train.output_dir = folder
    weights = distill_cfg.weights or weights_path(folder, "best")
    problem = path_problem(weights)
    if problem:
        raise UserError(f"distill.teacher: no weights at {weights} (it {problem}); let the "
                        f"teacher's run finish, or name a weights file with distill.weights")
    return load_trained(cfg, precision, weights, config_path)[0], cfg.model.num_classes, weights


def _ppim_teacher(name, distill_cfg, num_classes, precision):
    """PPIM's model ``name`` (sized by ``distill.kwargs``) with ``distill.weights``."""
    from utils.config import validate
    from utils.schema import MODEL

    if not distill_cfg.weights:
        raise UserError(f"config key 'distill.weights' is missing: the PPIM teacher {name} "
                        f"needs weights trained for these {num_classes} classes (.safetensors "
                        f"or .pdparams)")
    problem = path_problem(distill_cfg.weights)
    if problem:
        raise UserError(f"distill.weights {distill_cfg.weights} {problem}")
    model_cfg = validate({"name": name, "pretrained": False, "num_classes": num_classes,
                          "kwargs": dict(distill_cfg.kwargs)}, MODEL, "distill")
    model = precision.prepare(build_model(model_cfg, load_pretrained=False, amp=precision.mode))
    print(describe_load(distill_cfg.weights,
                        load_weights(model, distill_cfg.weights, strict=True)), flush=True)
    return model, num_classes, distill_cfg.weights


def build_teacher(distill_cfg: DistillConfig, num_classes: int,
                  precision: Precision) -> paddle.nn.Layer:
    """The teacher the ``distill`` section names, frozen: eval mode (no dropout), no
    gradients, cast as the run's ``precision`` casts the student."""
    source = distill_cfg.teacher
    print(f"distillation teacher: {source}", flush=True)
    if os.path.isdir(source):
        teacher, classes, weights = _run_teacher(source, distill_cfg, precision)
    else:
        try:
            ppim_constructor(source)
        except UserError:
            raise UserError(f"distill.teacher {source!r} is neither a run folder of this "
                            f"project (with config.yaml) nor a PPIM model name") from None
        teacher, classes, weights = _ppim_teacher(source, distill_cfg, num_classes, precision)
    if classes != num_classes:
        raise UserError(f"distill.teacher {source} predicts {classes} classes, this run "
                        f"{num_classes} (model.num_classes); use a teacher of the same classes")
    teacher.eval()
    for param in teacher.parameters():
        param.stop_gradient = True
    backbone = backbone_of(teacher)
    if hasattr(backbone, "pos_embed"):  # what each stage's resolution is resampled from
        teacher.native_pos_embed = backbone.pos_embed.astype("float32").numpy()
    teacher.pin = {"weights": os.path.abspath(weights), "sha256": file_digest(weights)}
    return teacher


def check_teacher_pin(saved: Optional[dict], teacher: paddle.nn.Layer, folder: str) -> None:
    """A resumed run learns from the teacher it started with: one :class:`UserError` when
    the weights file differs from the one the checkpoint in ``folder`` recorded (``saved``;
    ``None`` for a checkpoint from before teachers were recorded)."""
    if saved and saved["sha256"] != teacher.pin["sha256"]:
        raise UserError(f"the distillation teacher's weights differ from those the checkpoint "
                        f"in {folder} was trained with ({saved['weights']}, sha256 "
                        f"{saved['sha256'][:12]}...; now {teacher.pin['weights']}, "
                        f"{teacher.pin['sha256'][:12]}...); resume with that teacher, or start "
                        f"again")
