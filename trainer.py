"""The staged training run: stages of epochs, each with its optimizer, schedule and data."""

import os

from data.dataset import (
    ImageArrayDataset,
    build_loader,
    check_labels,
    eval_loader,
    load_split,
    set_epoch,
    subset_indices,
)
from data.preprocess import DevicePreprocess
from engine import evaluate, train_one_epoch
from losses import build_loss
from models.build import build_model, resolve_image_size
from utils.checkpoint import save_checkpoint, weights_path
from utils.cli import seed_everything, select_device
from utils.config import dump_config
from utils.logger import RunLogger
from utils.optim import build_optimizer, describe_stage, stage_data

TRAIN_SUBSET_STREAM, VAL_SUBSET_STREAM = 0, 1


def _stage_loaders(cfg, data_cfg, train_split, test_split):
    seed = cfg.train.seed
    train_images, train_labels = train_split
    keep = subset_indices(len(train_labels), data_cfg.train_subset, (seed, TRAIN_SUBSET_STREAM),
                          "data.train_subset")
    train_set = ImageArrayDataset(train_images[keep], train_labels[keep],
                                  hflip_prob=data_cfg.hflip_prob, rotation=data_cfg.rotation,
                                  seed=seed)
    train_loader = build_loader(train_set, data_cfg.batch_size, data_cfg.num_workers, train=True)
    test_images, test_labels = test_split
    keep = subset_indices(len(test_labels), data_cfg.val_subset, (seed, VAL_SUBSET_STREAM),
                          "data.val_subset")
    return train_loader, eval_loader(test_images[keep], test_labels[keep], data_cfg)


def _is_better(val, best):
    """A larger validation set supersedes a subset; on the same set, higher top-1 wins."""
    if best is None:
        return True
    return (val["num_samples"], val["top1"]) > (best["val_num_samples"], best["val_top1"])


def fit(cfg):
    """Run every stage of ``cfg``; write checkpoints, metrics.jsonl and VisualDL logs."""
    out = cfg.train.output_dir
    device = select_device()
    seed_everything(cfg.train.seed)
    train_images, train_labels, _ = load_split(cfg.data, "train")
    test_images, test_labels, _ = load_split(cfg.data, "test")
    check_labels(train_labels, cfg.model.num_classes, "train")
    check_labels(test_labels, cfg.model.num_classes, "test")
    model = build_model(cfg.model)
    preprocess = DevicePreprocess(resolve_image_size(cfg.data, model))
    criterion = build_loss(cfg.loss)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as handle:
        handle.write(dump_config(cfg))
    print(f"device {device}; {len(train_labels)} train / {len(test_labels)} val images; "
          f"output in {out}", flush=True)

    logger = RunLogger(out)
    best, epoch_index, step = None, 0, 0

    def on_step(values):
        nonlocal step
        logger.log_step(step, values)
        step += 1

    for stage_index, stage in enumerate(cfg.stages):
        data_cfg = stage_data(cfg.data, stage)
        print(describe_stage(stage_index, stage, data_cfg), flush=True)
        train_loader, val_loader = _stage_loaders(cfg, data_cfg, (train_images, train_labels),
                                                  (test_images, test_labels))
        optimizer, scheduler = build_optimizer(stage, model.parameters(),
                                               stage.epochs * len(train_loader))
        for epoch in range(stage.epochs):
            set_epoch(train_loader, epoch_index)
            desc = f"stage {stage_index} epoch {epoch + 1}/{stage.epochs}"
            stats = train_one_epoch(model, criterion, preprocess, train_loader, optimizer,
                                    scheduler, on_step=on_step, desc=desc)
            val = evaluate(model, preprocess, val_loader, cfg.model.num_classes, desc="val")
            record = {
                "stage": stage_index, "epoch": epoch, "lr": optimizer.get_lr(),
                "train_loss": stats["loss"], "train_ce": stats["ce"], "train_kl": stats["kl"],
                "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
                "images_per_s": stats["images_per_s"],
            }
            logger.log_epoch(epoch_index, record)
            meta = dict(record, epoch_index=epoch_index, val_num_samples=val["num_samples"])
            save_checkpoint(out, "last", model, meta, optimizer)
            if _is_better(val, best):
                best = meta
                save_checkpoint(out, "best", model, meta)
            print(f"{desc}: loss {stats['loss']:.4f} (ce {stats['ce']:.4f}, kl {stats['kl']:.4f}) "
                  f"val top1 {val['top1']:.4f} top5 {val['top5']:.4f} loss {val['loss']:.4f} "
                  f"on {val['num_samples']} | {stats['images_per_s']:.1f} img/s", flush=True)
            epoch_index += 1
    logger.close()
    print(f"best val top1 {best['val_top1']:.4f} (stage {best['stage']} epoch {best['epoch'] + 1}); "
          f"weights in {weights_path(out, 'best')}", flush=True)
    return best
