"""Per-stage optimizers and learning-rate schedules, built from the config with Paddle's parts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Union

import paddle
from paddle.optimizer import Optimizer
from paddle.optimizer.lr import LRScheduler

from training.optimizers import OPTIMIZERS
from training.recipe import StageLength
from training.schedules import SCHEDULES
from utils.errors import UserError
from utils.schema import StageConfig, TrainConfig

if TYPE_CHECKING:
    from training.amp import Precision

# Parameters DeiT excludes from weight decay besides every bias and norm (1-D) tensor.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")
HALF_TYPES = (paddle.float16, paddle.bfloat16)


def warmup_steps(stage: StageConfig, steps_per_epoch: float) -> int:
    """The stage's warmup length in optimizer steps (given in steps or in epochs, not both)."""
    steps = stage.warmup.steps or int(round(stage.warmup.epochs * steps_per_epoch))
    if steps and stage.warmup.start_lr >= stage.optimizer.lr:
        raise UserError(f"stage '{stage.name}': warmup.start_lr={stage.warmup.start_lr:g} must "
                        f"be below optimizer.lr={stage.optimizer.lr:g}; lower it or drop the warmup")
    return steps


def build_schedule(stage: StageConfig, steps_per_epoch: int,
                   scale: float = 1.0) -> Union[float, LRScheduler]:
    """The stage's LR: a float (constant) or a ``paddle.optimizer.lr`` scheduler stepped per update.

    The stage's schedule (:mod:`training.schedules`) runs over the steps after the warmup;
    LinearWarmup wraps whichever schedule the stage has. ``scale`` multiplies every learning rate of the
    stage (``train.lr_scaling``).
    """
    lr = stage.optimizer.lr * scale
    total = StageLength.of(stage, steps_per_epoch).steps
    warmup = warmup_steps(stage, steps_per_epoch)
    schedule = SCHEDULES[stage.lr_schedule.name].build(stage.lr_schedule, lr,
                                                       max(total - warmup, 1), scale)
    if warmup:
        schedule = paddle.optimizer.lr.LinearWarmup(learning_rate=schedule, warmup_steps=warmup,
                                                    start_lr=stage.warmup.start_lr * scale,
                                                    end_lr=lr)
    return schedule


def decay_groups(model: paddle.nn.Layer, exclude: bool) -> list[dict]:
    """Parameter groups: decayed, and (with ``exclude``) biases, norms, position embedding and tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        skip = exclude and (len(param.shape) <= 1 or name.split(".")[-1] in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(param)
    # An empty group makes Paddle's optimizer fail with an IndexError (a stage that trains
    # only ``head.bias`` or ``pos_embed`` has nothing to decay).
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(stage: StageConfig, model: paddle.nn.Layer, steps_per_epoch: int,
                    train_cfg: TrainConfig, master_weights: bool = False,
                    masters: Optional[dict] = None,
                    lr_scale: float = 1.0) -> tuple[Optimizer, Optional[LRScheduler]]:
    """The stage's optimizer and LR scheduler (``None`` for a constant LR without warmup).

    ``lr_scale`` multiplies the stage's learning rates (``train.lr_scaling``).
    ``master_weights`` keeps float32 copies of half-precision weights (AMP O2);
    ``masters`` (parameter name -> float32 tensor, see :func:`master_copies`) are the
    previous stage's copies, which the new optimizer continues from instead of making
    new ones from the half-precision weights. Gradient clipping is not the optimizer's
    job here (Paddle clips per parameter group): see :mod:`training.grads`.
    """
    lr = build_schedule(stage, steps_per_epoch, lr_scale)
    opt = stage.optimizer
    groups = decay_groups(model, train_cfg.exclude_from_decay)
    optimizer = OPTIMIZERS[opt.name].build(opt, lr, groups, master_weights)
    scheduler = lr if isinstance(lr, paddle.optimizer.lr.LRScheduler) else None
    if master_weights and masters:
        state = {"master_weights": dict(masters)}
        if scheduler is not None:  # Paddle insists on it; the fresh schedule's own state
            state["LR_Scheduler"] = scheduler.state_dict()
        optimizer.set_state_dict(state)
    return optimizer, scheduler


def master_copies(optimizer: paddle.optimizer.Optimizer) -> dict:
    """The optimizer's float32 master copies of half-precision weights (AMP O2), keyed by
    parameter name; empty without them (float32 weights, or before the first update)."""
    return dict(optimizer.state_dict().get("master_weights", {}))


def master_named(param_name: str, tensor: paddle.Tensor) -> paddle.Tensor:
    """``tensor`` named as Paddle names the master copy of ``param_name`` (in the fresh name
    scope of each update, :func:`training.grads.apply_update`). The optimizer names its state
    for a master copy after it, so the name must start with the parameter's for a
    checkpoint to load in another process."""
    tensor.name = f"{param_name}_fp32_master_0"
    return tensor


def cast_keeping_masters(model: paddle.nn.Layer, cast: Callable) -> dict[str, paddle.Tensor]:
    """Apply ``cast`` (AMP O2's weight cast) to ``model``; return float32 copies, taken
    before it, of the parameters it turned to half precision, keyed by parameter name."""
    before = {param.name: param.detach().astype("float32").clone() for param in model.parameters()}
    cast(model)
    return {param.name: master_named(param.name, before[param.name])
            for param in model.parameters() if param.dtype in HALF_TYPES}


class MasterCopies:
    """AMP O2's float32 master copies of the half-precision weights, carried across stages.

    Each stage builds a new optimizer, which would make its master copies from the
    half-precision weights and so round every weight at every stage change. Here they
    start from the loaded weights before the cast (or from a checkpoint's optimizer
    state) and pass from each stage's optimizer to the next; EMA, SWA and the best raw
    weights use them too. Empty without O2.
    """

    def __init__(self, model: paddle.nn.Layer, precision: Precision,
                 saved_optimizer: Optional[dict] = None) -> None:
        """Cast ``model`` per ``precision`` (O2) and keep the copies to start from."""
        self.model, self.enabled, self.by_name = model, precision.half_weights, {}
        if not self.enabled:
            return
        if saved_optimizer is None:
            self.by_name = cast_keeping_masters(model, precision.prepare)
        else:
            precision.prepare(model)
            self.by_name = optimizer_state_for(model, saved_optimizer).get("master_weights", {})

    def carry(self, optimizer: paddle.optimizer.Optimizer) -> None:
        """Take the copies of a stage's optimizer, for the next stage's (those of parameters
        it did not train are kept)."""
        if self.enabled:
            self.by_name = {**self.by_name, **master_copies(optimizer)}

    def by_path(self,
                optimizer: Optional[paddle.optimizer.Optimizer] = None) -> dict[str, paddle.Tensor]:
        """The current copies (``optimizer``'s, once it has them) keyed by state-dict path,
        for the model's half-precision parameters."""
        if not self.enabled:
            return {}
        masters = {**self.by_name, **(master_copies(optimizer) if optimizer else {})}
        return {path: masters[param.name] for path, param in self.model.named_parameters()
                if param.name in masters and param.dtype in HALF_TYPES}


def _rename_state(state, renames):
    """Rename the keys of an optimizer state dict (and of its master weights) by prefix."""
    prefixes = sorted(renames, key=len, reverse=True)  # "linear_12.w_0" before "linear_1.w_0"

    def rename(key: str) -> str:
        for old in prefixes:
            if key == old or key.startswith(old + "_"):
                return renames[old] + key[len(old):]
        return key

    result = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):
            result[key] = {rename(k): v for k, v in value.items()}
        elif key == "LR_Scheduler":
            result[key] = value
        else:
            result[rename(key)] = value
    return result


def portable_optimizer_state(model: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer) -> dict:
    """The optimizer's state keyed by parameter paths (``blocks.0.attn.qkv.weight``) instead of
    Paddle's per-process parameter names (``linear_12.w_0``), which differ between processes
    that build models in another order."""
    return _rename_state(optimizer_tensors(optimizer),
                         {param.name: f"@{path}" for path, param in model.named_parameters()})


def optimizer_tensors(optimizer: paddle.optimizer.Optimizer) -> dict:
    """Every tensor of the optimizer's state, those restored but not yet used by a step
    included: ``set_state_dict`` keeps restored moments aside until the step that creates
    their accumulator, and Paddle 2.6's ``state_dict()`` leaves them out (3.x returns them
    only while no accumulator exists), so a checkpoint written between a resume and its
    first step would otherwise lose them."""
    state = optimizer.state_dict()
    waiting = getattr(optimizer, "_accumulators_holder", None) or {}
    return {**{name: tensor for name, tensor in waiting.items() if name not in state}, **state}


def optimizer_state_for(model: paddle.nn.Layer, portable: dict) -> dict:
    """Map a :func:`portable_optimizer_state` back onto this process's parameter names."""
    state = _rename_state(portable,
                          {f"@{path}": param.name for path, param in model.named_parameters()})
    if "master_weights" in state:
        state["master_weights"] = {name: master_named(name, tensor)
                                   for name, tensor in state["master_weights"].items()}
    return state
