"""One training epoch and one evaluation pass, the same on CPU, one GPU or N ranks."""

import time

import numpy as np
import paddle
from tqdm import tqdm

from losses.rdrop import log_softmax, nll


def train_step(model, criterion, preprocess, images, labels):
    """Forward and backward of one batch; returns the loss parts.

    With R-Drop (``criterion.copies == 2``) the batch is doubled as ``[x; x]`` and
    passed once: both copies see independent dropout masks at the same rate, at
    the cost of one forward over 2B images instead of two separate passes.
    """
    x = preprocess(images)
    if criterion.copies == 2:
        x = paddle.concat([x, x])
    parts = criterion(model(x), labels)
    parts["loss"].backward()
    return parts


def train_one_epoch(model, criterion, preprocess, loader, optimizer, scheduler,
                    on_step=None, desc="train"):
    """Train over ``loader`` once; return the per-sample mean loss parts and images/s."""
    model.train()
    sums = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
    seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, dynamic_ncols=True, mininterval=1.0)
    for images, labels in bar:
        parts = train_step(model, criterion, preprocess, images, labels)
        optimizer.step()
        optimizer.clear_grad()
        lr = optimizer.get_lr()
        if scheduler is not None:
            scheduler.step()
        values = {name: float(value) for name, value in parts.items()}
        batch = labels.shape[0]
        seen += batch
        for name in sums:
            sums[name] += values[name] * batch
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        if on_step is not None:
            on_step(dict(values, lr=lr))
    elapsed = time.perf_counter() - start
    result = {name: total / max(seen, 1) for name, total in sums.items()}
    result["images_per_s"] = seen / elapsed if elapsed > 0 else 0.0
    return result


@paddle.no_grad()
def evaluate(model, preprocess, loader, num_classes, desc="eval"):
    """Top-1, top-5 and cross-entropy averaged per sample, plus per-class top-1.

    Every sample counts once, whatever the batch sizes (the last batch included).
    """
    model.eval()
    topk = min(5, num_classes)
    correct1 = correct5 = 0
    loss_sum = 0.0
    class_correct = np.zeros(num_classes, dtype=np.int64)
    class_total = np.zeros(num_classes, dtype=np.int64)
    for images, labels in tqdm(loader, desc=desc, dynamic_ncols=True, mininterval=1.0):
        logits = model(preprocess(images)).astype("float32")
        labels = labels.reshape([-1]).astype("int64")
        batch = labels.shape[0]
        loss_sum += float(nll(log_softmax(logits), labels)) * batch
        top = paddle.topk(logits, k=topk, axis=-1)[1].numpy()
        truth = labels.numpy()
        hit1 = top[:, 0] == truth
        correct1 += int(hit1.sum())
        correct5 += int((top == truth[:, None]).any(axis=1).sum())
        class_total += np.bincount(truth, minlength=num_classes)
        class_correct += np.bincount(truth[hit1], minlength=num_classes)
    total = int(class_total.sum())
    per_class = np.where(class_total > 0, class_correct / np.maximum(class_total, 1), np.nan)
    return {
        "top1": correct1 / max(total, 1),
        "top5": correct5 / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "num_samples": total,
        "per_class_top1": [None if np.isnan(v) else float(v) for v in per_class],
    }
