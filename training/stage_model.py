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
              f"({', '.join(stage.trainable)}); the others are frozen; "
              + frozen_line(model, stage.frozen_mode), flush=True)
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
    for average in averages.values():
        average.average = fit_resolution(average.average, model)
    return True


def trainable_paths(model, prefixes, stage_index):
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


def set_trainable(model, prefixes, stage_index):
    """Train the parameters :func:`trainable_paths` chooses, freeze the others. Returns
    ``(trained, total)`` parameter counts."""
    chosen = trainable_paths(model, prefixes, stage_index)
    params = dict(model.named_parameters())
    for path, param in params.items():
        param.stop_gradient = path not in chosen
    return len(chosen), len(params)


def train_mode(model, frozen_eval=True):
    """``model.train()``, then, with ``frozen_eval``, the frozen part back in eval mode (no
    dropout, attention dropout or drop path), as at test time: every layer whose parameters
    are all frozen, and every layer without parameters (a dropout) that feeds one. A FixRes
    stage thus fits its trained part on the features evaluation will give it."""
    model.train()
    if frozen_eval:
        _frozen_to_eval(model)
    return model


def _frozen_to_eval(layer):
    children = [child for _, child in layer.named_children()]
    params = [list(child.parameters()) for child in children]
    trains = [any(not p.stop_gradient for p in group) for group in params]
    for i, child in enumerate(children):
        if params[i]:
            if trains[i]:
                _frozen_to_eval(child)
            else:
                child.eval()
            continue
        following = next((j for j in range(i + 1, len(children)) if params[j]), None)
        if following is not None and not trains[following]:
            child.eval()  # a parameterless layer (dropout) in front of a frozen one


def random_layers(model):
    """The layers that draw random numbers in the model's current mode (dropout and drop
    path with a rate above 0, in training mode)."""
    return [layer for layer in model.sublayers() if layer.training and (
        (isinstance(layer, paddle.nn.Dropout) and layer.p > 0)
        or getattr(layer, "drop_prob", 0) > 0)]


def frozen_line(model, frozen_mode):
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
