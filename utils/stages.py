"""The stage plan: per-stage overrides of the data and loss sections, and its description."""


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
    """One line of the run-wide training settings: batch, accumulation, clipping, precision,
    averages."""
    train = cfg.train
    parts = [f"batch {cfg.data.batch_size} x accum {train.accum_steps} = "
             f"{cfg.data.batch_size * train.accum_steps} images per update (per rank)",
             f"clip global norm {train.clip_grad_norm:g}" if train.clip_grad_norm else "no clipping",
             "no decay on biases/norms/pos_embed/tokens" if train.exclude_from_decay
             else "decay on every parameter",
             f"AMP {train.amp} ({train.amp_level})" if train.amp != "off" else "float32",
             f"fused attention {cfg.model.fused_attention}"]
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
