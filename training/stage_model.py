"""The model a run trains (built, or restored from a checkpoint) and what a stage changes
in it: the resolution it runs at and the parameters it trains.

A FixRes stage (a few epochs of the head at the test resolution) does both. The position
embedding is resampled (:mod:`models.resolution`) in the model and, so that they stay
loadable into it, in the weight averages and AMP O2's float32 master copy, which is where
the model's own half-precision embedding is resampled from.
"""

import paddle

from data.preprocess import DevicePreprocess
from models.build import build_model, input_size
from models.resolution import backbone_of, fit_resolution, resolution_of, set_resolution
from training.optim import MasterCopies, master_named
from utils.errors import UserError
from utils.io.tensor_io import as_paddle, load_state
from utils.runtime.dist import world_size, wrap


def run_model(cfg, precision, restored):
    """``(model, masters, base_size)``: the run's model with its pretrained weights, or with
    a checkpoint's tensors ``restored`` (at the checkpoint's resolution); its float32
    master copies (AMP O2, :class:`training.optim.MasterCopies`) and the loss scaler's state
    restored with them; the resolution of stages that set no ``data.image_size``."""
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
    return model, masters, base_size


def prepare_stage(model, index, stage, size, averages, masters, teacher=None, wrapped=None):
    """Set ``model`` up for stage ``index``: its resolution ``size`` and the parameters
    ``stage.trainable`` names. Returns the model to train and the device preprocessing for
    ``size``. With ranks the model trains inside a DataParallel, which syncs the parameters
    that train when it is built: ``wrapped`` (the previous stage's) is kept while they stay
    the same; a stage that changes them is refused with ranks, as Paddle crashes on a second
    DataParallel of one model."""
    before = {path for path, param in model.named_parameters() if not param.stop_gradient}
    changed = change_resolution(model, size, averages, masters, teacher)
    trained, total = set_trainable(model, stage.trainable, index)
    if stage.trainable is not None:
        print(f"stage {index} trains {trained} of {total} parameter tensors "
              f"({', '.join(stage.trainable)}); the others are frozen", flush=True)
    after = {path for path, param in model.named_parameters() if not param.stop_gradient}
    if wrapped is not None and not changed and before == after:
        return wrapped, DevicePreprocess(size)
    if wrapped is not None and world_size() > 1:
        raise UserError(f"stage {index} changes the resolution or the trained parameters "
                        f"(stages.{index}.data.image_size / .trainable), which runs on one "
                        f"process only; run it without paddle.distributed.launch (resume the "
                        f"run there with --resume)")
    return wrap(model), DevicePreprocess(size)


def change_resolution(model, size, averages, masters, teacher=None):
    """Make ``model`` (and ``teacher``, when it is a ViT) run at ``size × size``; resample
    the position embedding of each average in ``averages`` and of the
    :class:`training.optim.MasterCopies` ``masters``. True when the size changed."""
    if teacher is not None and hasattr(backbone_of(teacher), "pos_embed"):
        set_resolution(teacher, size)
    if input_size(model) == size:
        return False
    old = backbone_of(model).pos_embed
    master = masters.by_name.pop(old.name, None)
    resampled = set_resolution(model, size, None if master is None else master.numpy())
    if master is not None:
        new = backbone_of(model).pos_embed
        masters.by_name[new.name] = master_named(new.name, paddle.to_tensor(resampled))
    for average in averages.values():
        average.average = fit_resolution(average.average, model)
    return True


def set_trainable(model, prefixes, stage_index):
    """Train the parameters whose state-dict path is one of ``prefixes`` or lies under one
    (``head`` covers ``head.weight`` and ``head.bias``), freeze the others; all train when
    ``prefixes`` is ``None``. Returns ``(trained, total)`` parameter counts."""
    params = dict(model.named_parameters())
    if prefixes is None:
        chosen = set(params)
    else:
        unmatched = [p for p in prefixes
                     if not any(path == p or path.startswith(p + ".") for path in params)]
        if unmatched:
            tops = sorted({".".join(path.split(".")[:2 if path.startswith("backbone.") else 1])
                           for path in params})
            raise UserError(f"config key 'stages.{stage_index}.trainable': {unmatched[0]!r} "
                            f"names no parameter of this model; its layers include "
                            f"{', '.join(tops[:12])}")
        chosen = {path for path in params
                  if any(path == p or path.startswith(p + ".") for p in prefixes)}
    for path, param in params.items():
        param.stop_gradient = path not in chosen
    return len(chosen), len(params)
