"""Per-stage optimizers and learning-rate schedules, built from the config with Paddle's parts."""

import paddle

from utils.errors import UserError

# Parameters DeiT excludes from weight decay besides every bias and norm (1-D) tensor.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")


def warmup_steps(stage, steps_per_epoch):
    """The stage's warmup length in optimizer steps (given in steps or in epochs, not both)."""
    steps = stage.warmup.steps or int(round(stage.warmup.epochs * steps_per_epoch))
    if steps and stage.warmup.start_lr >= stage.optimizer.lr:
        raise UserError(f"stage '{stage.name}': warmup.start_lr={stage.warmup.start_lr:g} must "
                        f"be below optimizer.lr={stage.optimizer.lr:g}; lower it or drop the warmup")
    return steps


def build_schedule(stage, steps_per_epoch):
    """The stage's LR: a float (constant) or a ``paddle.optimizer.lr`` scheduler stepped per update.

    Polynomial decay runs over the steps after the warmup; LinearWarmup wraps
    whichever schedule the stage has.
    """
    lr = stage.optimizer.lr
    total = stage.epochs * steps_per_epoch
    warmup = warmup_steps(stage, steps_per_epoch)
    schedule = lr
    if stage.lr_schedule.name == "polynomial":
        schedule = paddle.optimizer.lr.PolynomialDecay(
            learning_rate=lr, decay_steps=max(total - warmup, 1),
            end_lr=stage.lr_schedule.end_lr, power=stage.lr_schedule.power)
    if warmup:
        schedule = paddle.optimizer.lr.LinearWarmup(learning_rate=schedule, warmup_steps=warmup,
                                                    start_lr=stage.warmup.start_lr, end_lr=lr)
    return schedule


def decay_groups(model, exclude):
    """Parameter groups: decayed, and (with ``exclude``) biases, norms, position embedding and tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        skip = exclude and (len(param.shape) <= 1 or name.split(".")[-1] in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(stage, model, steps_per_epoch, train_cfg, master_weights=False):
    """The stage's optimizer and LR scheduler (``None`` for a constant LR without warmup).

    ``master_weights`` keeps float32 copies of half-precision weights (AMP O2).
    """
    lr = build_schedule(stage, steps_per_epoch)
    opt = stage.optimizer
    groups = decay_groups(model, train_cfg.exclude_from_decay)
    clip = (paddle.nn.ClipGradByGlobalNorm(train_cfg.clip_grad_norm)
            if train_cfg.clip_grad_norm else None)
    if opt.name == "AdamW":
        optimizer = paddle.optimizer.AdamW(learning_rate=lr, beta1=opt.betas[0], beta2=opt.betas[1],
                                           epsilon=opt.epsilon, weight_decay=opt.weight_decay,
                                           parameters=groups, grad_clip=clip,
                                           multi_precision=master_weights)
    else:
        optimizer = paddle.optimizer.Momentum(
            learning_rate=lr, momentum=opt.momentum, use_nesterov=opt.use_nesterov,
            weight_decay=paddle.regularizer.L2Decay(opt.l2_decay) if opt.l2_decay else None,
            parameters=groups, grad_clip=clip, multi_precision=master_weights)
    scheduler = lr if isinstance(lr, paddle.optimizer.lr.LRScheduler) else None
    return optimizer, scheduler


def _rename_state(state, renames):
    """Rename the keys of an optimizer state dict (and of its master weights) by prefix."""
    prefixes = sorted(renames, key=len, reverse=True)  # "linear_12.w_0" before "linear_1.w_0"

    def rename(key):
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


def portable_optimizer_state(model, optimizer):
    """The optimizer's state keyed by parameter paths (``blocks.0.attn.qkv.weight``) instead of
    Paddle's per-process parameter names (``linear_12.w_0``), which differ between processes
    that build models in another order."""
    return _rename_state(optimizer.state_dict(),
                         {param.name: f"@{path}" for path, param in model.named_parameters()})


def optimizer_state_for(model, portable):
    """Map a :func:`portable_optimizer_state` back onto this process's parameter names."""
    return _rename_state(portable, {f"@{path}": param.name for path, param in model.named_parameters()})
