"""Per-stage optimizers and learning-rate schedules, built from the config with Paddle's parts."""

import paddle


def build_schedule(stage, total_steps):
    """The stage's LR: a float (constant) or a ``paddle.optimizer.lr`` scheduler stepped per batch."""
    lr = stage.optimizer.lr
    schedule = stage.lr_schedule
    if schedule.name == "constant":
        return lr
    return paddle.optimizer.lr.PolynomialDecay(learning_rate=lr, decay_steps=max(total_steps, 1),
                                               end_lr=schedule.end_lr, power=schedule.power)


def build_optimizer(stage, parameters, total_steps):
    """The stage's optimizer and LR scheduler (``None`` for a constant LR)."""
    lr = build_schedule(stage, total_steps)
    opt = stage.optimizer
    if opt.name == "AdamW":
        optimizer = paddle.optimizer.AdamW(learning_rate=lr, beta1=opt.betas[0], beta2=opt.betas[1],
                                           epsilon=opt.epsilon, weight_decay=opt.weight_decay,
                                           parameters=parameters)
    else:
        optimizer = paddle.optimizer.Momentum(
            learning_rate=lr, momentum=opt.momentum, use_nesterov=opt.use_nesterov,
            weight_decay=paddle.regularizer.L2Decay(opt.l2_decay) if opt.l2_decay else None,
            parameters=parameters)
    scheduler = lr if isinstance(lr, paddle.optimizer.lr.LRScheduler) else None
    return optimizer, scheduler


def describe_stage(index, stage, data_cfg):
    """One line of the stage plan: epochs, optimizer, LR schedule, decay and data."""
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

    def size(n):
        return "all" if n is None else str(n)

    data_text = (f"train {size(data_cfg.train_subset)} / val {size(data_cfg.val_subset)} images, "
                 f"batch {data_cfg.batch_size}, hflip p={data_cfg.hflip_prob:g}, "
                 f"rotation ±{data_cfg.rotation:g}°")
    name = stage.name or f"stage {index}"
    return f"[{index}] {name}: {stage.epochs} epoch(s); {opt_text}; {sched_text}; {data_text}"


def stage_data(data_cfg, stage):
    """The data section with the stage's overrides applied."""
    merged = type(data_cfg)(data_cfg)
    merged.update(stage.data)
    return merged
