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


def build_optimizer(stage, model, steps_per_epoch, train_cfg):
    """The stage's optimizer and LR scheduler (``None`` for a constant LR without warmup)."""
    lr = build_schedule(stage, steps_per_epoch)
    opt = stage.optimizer
    groups = decay_groups(model, train_cfg.exclude_from_decay)
    clip = (paddle.nn.ClipGradByGlobalNorm(train_cfg.clip_grad_norm)
            if train_cfg.clip_grad_norm else None)
    if opt.name == "AdamW":
        optimizer = paddle.optimizer.AdamW(learning_rate=lr, beta1=opt.betas[0], beta2=opt.betas[1],
                                           epsilon=opt.epsilon, weight_decay=opt.weight_decay,
                                           parameters=groups, grad_clip=clip)
    else:
        optimizer = paddle.optimizer.Momentum(
            learning_rate=lr, momentum=opt.momentum, use_nesterov=opt.use_nesterov,
            weight_decay=paddle.regularizer.L2Decay(opt.l2_decay) if opt.l2_decay else None,
            parameters=groups, grad_clip=clip)
    scheduler = lr if isinstance(lr, paddle.optimizer.lr.LRScheduler) else None
    return optimizer, scheduler


def _rename_state(state, renames):
    """Rename the keys of an optimizer state dict (and of its master weights) by prefix."""
    def rename(key):
        for old in sorted(renames, key=len, reverse=True):
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


def describe_stage(index, stage, data_cfg, loss_cfg):
    """One line of the stage plan: epochs, stop condition, optimizer, LR, decay, data and loss."""
    opt = stage.optimizer
    if opt.name == "AdamW":
        opt_text = (f"AdamW lr={opt.lr:g} betas=({opt.betas[0]:g}, {opt.betas[1]:g}) "
                    f"eps={opt.epsilon:g} weight_decay={opt.weight_decay:g}")
    else:
        opt_text = (f"Momentum lr={opt.lr:g} momentum={opt.momentum:g} l2_decay={opt.l2_decay:g}"
                    + (" nesterov" if opt.use_nesterov else ""))
    schedule = stage.lr_schedule
    sched_text = ("constant LR" if schedule.name == "constant" else
                  f"polynomial decay to {schedule.end_lr:g} (power {schedule.power:g}) over the stage")
    if stage.warmup.steps or stage.warmup.epochs:
        length = (f"{stage.warmup.steps} steps" if stage.warmup.steps
                  else f"{stage.warmup.epochs:g} epochs")
        sched_text += f" after {length} of linear warmup from {stage.warmup.start_lr:g}"
    until = " or ".join(f"{key} >= {value:g}" for key, value in stage.until.items()
                        if value is not None)

    def size(n):
        return "all" if n is None else str(n)

    data_text = (f"train {size(data_cfg.train_subset)} / val {size(data_cfg.val_subset)} images, "
                 f"batch {data_cfg.batch_size}, hflip p={data_cfg.hflip_prob:g}, "
                 f"rotation ±{data_cfg.rotation:g}°")
    loss_text = f"R-Drop alpha={loss_cfg.alpha:g}" if loss_cfg.rdrop else "cross-entropy"
    name = stage.name or f"stage {index}"
    epochs = f"up to {stage.epochs} epoch(s) until {until}" if until else f"{stage.epochs} epoch(s)"
    return f"[{index}] {name}: {epochs}; {opt_text}; {sched_text}; {data_text}; {loss_text}"


def describe_run(cfg):
    """One line of the run-wide training settings: batch, accumulation, clipping, averages."""
    train = cfg.train
    parts = [f"batch {cfg.data.batch_size} x accum {train.accum_steps} = "
             f"{cfg.data.batch_size * train.accum_steps} images per update (per rank)",
             f"clip global norm {train.clip_grad_norm:g}" if train.clip_grad_norm else "no clipping",
             "no decay on biases/norms/pos_embed/tokens" if train.exclude_from_decay
             else "decay on every parameter"]
    if train.ema.enabled:
        parts.append(f"EMA decay {train.ema.decay:g}" + (" with warm-up" if train.ema.warmup else ""))
    if train.swa.enabled:
        parts.append(f"SWA from stage {train.swa.stage % len(cfg.stages)} "
                     f"epoch {train.swa.start_epoch + 1}")
    if train.save_every_steps:
        parts.append(f"checkpoint every {train.save_every_steps} steps")
    return "; ".join(parts)


def stage_data(data_cfg, stage):
    """The data section with the stage's overrides applied."""
    merged = type(data_cfg)(data_cfg)
    merged.update(stage.data)
    return merged


def stage_loss(loss_cfg, stage):
    """The loss section with the stage's overrides (those not null) applied."""
    merged = type(loss_cfg)(loss_cfg)
    merged.update({key: value for key, value in stage.loss.items() if value is not None})
    return merged
