"""A trained run's model for evaluation, prediction and export: the config's model with the
run's best (or given) weights, refused when the run was trained with another model or other
classes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from models.build import build_model, describe_load, load_weights
from training.recipe import final_image_size
from training.state import first_difference, saved_config, value_at
from utils.checkpoint import weights_path
from utils.config import to_plain
from utils.errors import UserError
from utils.io.files import path_problem
from utils.yaml_text import read_yaml

if TYPE_CHECKING:
    import paddle

    from training.amp import Precision
    from utils.schema import Config


# What a run's best weights must have been trained with to serve another config: the model
# and the kind of data (the class names travel with the weights, so the data itself may be
# elsewhere).
TRAINED_WITH = ("model.name", "model.num_classes", "model.head", "model.mlp_hidden",
                "model.kwargs", "data.name")


def _check_trained_with(cfg, config):
    """One error when the run in ``cfg.train.output_dir`` was trained with another model or
    other classes than ``cfg`` (its ``config.yaml`` says): its best weights would be read
    as this config's silently."""
    saved_path = os.path.join(cfg.train.output_dir, "config.yaml")
    if path_problem(saved_path):
        return
    try:
        saved = saved_config(read_yaml(saved_path))
    except UserError:  # damaged: not comparable
        return
    if saved is None:  # written by another version of this project: not comparable
        return
    current = to_plain(cfg)
    for key in TRAINED_WITH:
        changed = first_difference(value_at(saved, key), value_at(current, key), path=key)
        if changed:
            raise UserError(f"the run in {cfg.train.output_dir} was trained with another "
                            f"{changed} ({value_at(saved, changed)!r}, here "
                            f"{value_at(current, changed)!r}); pass the -o it was trained "
                            f"with (its config.yaml), or --weights PATH")


def load_trained(cfg: Config, precision: Precision, weights: Optional[str] = None,
                 config: str = "CONFIG") -> tuple[paddle.nn.Layer, str]:
    """``(model, path)``: the config's model with trained weights (``weights``, else the
    run's best) loaded strictly, in eval mode, at the resolution of the last stage
    (``data.image_size`` unless that stage sets its own). Missing weights are one error
    saying how to get them (``config`` names the config file in it)."""
    if weights and os.path.isdir(weights):  # a run folder: its best weights
        if path_problem(weights_path(weights, "best")):
            raise UserError(f"--weights {weights} is a folder without best.safetensors, not the "
                            f"folder of a run that has validated; pass a weights file or such a "
                            f"run's folder")
        weights = weights_path(weights, "best")
    path = weights or weights_path(cfg.train.output_dir, "best")
    problem = path_problem(path)
    if problem:
        raise UserError(f"no weights at {path} (it {problem}); train first (python main.py "
                        f"-c {config}) or pass --weights PATH")
    if weights is None:
        _check_trained_with(cfg, config)
    model = precision.prepare(build_model(cfg.model, load_pretrained=False, amp=precision.mode,
                                          image_size=final_image_size(cfg)))
    print(describe_load(path, load_weights(model, path, strict=True)), flush=True)
    model.eval()
    return model, path
