"""What a person reads of a run: one way to name a place in it, one line per epoch and per end.

Stages are numbered from 0, as in the config's ``stages.N``; epochs from 1 within their
stage ("stage 1 epoch 3/10"), in the console, in ``metrics.jsonl`` and ``best.json``.
"""

from __future__ import annotations

import os
from typing import Optional


def top5_text(value: Optional[float], form: str = " top5 {:.4f}") -> str:
    """A top-5 accuracy in ``form``, or nothing where there is none (at most five
    classes)."""
    return "" if value is None else form.format(value)


def place(stage: int, epoch: int, epochs: Optional[int] = None) -> str:
    """``stage S epoch E[/N]`` for a 0-based stage and a 1-based epoch."""
    return f"stage {stage} epoch {epoch}" + (f"/{epochs}" if epochs else "")


VALIDATION = {"held_out": "{} held out for validation (data.val_split)",
              "own": "{} of the data's own for validation",
              "test": "the test split as validation (data.val_split: 0)"}


def run_line(device: str, train: int, val: int, test: int, output_dir: str, source: str) -> str:
    """The line a run starts with: where it runs and the images of each split (``source``:
    where validation comes from, :func:`data.dataset.validation_source`)."""
    from utils.runtime.dist import rank, world_size

    validation = VALIDATION[source].format(val)
    return (f"device {device}, rank {rank()} of {world_size()}; {train} train images, "
            f"{validation}, {test} test; output in {output_dir}"
            + ("" if os.path.isabs(output_dir) else f" ({os.path.abspath(output_dir)}: "
                                                     f"train.output_dir is relative to the "
                                                     f"current folder)"))


def epoch_line(where: str, stats: dict, results: dict, loss_text: str,
               brief: bool = False) -> str:
    """The console line of one finished epoch: the training loss in its terms (``loss_text``,
    the criterion's :meth:`in_words`), validation metrics of the raw weights and of each
    average, gradient norms, speed. ``brief`` (a notebook's output, one line per epoch):
    the loss, validation top-1 of the weights and of each average, the speed, in one line
    that fits its width; ``metrics.jsonl`` holds the rest."""
    val = results["raw"]
    if brief:
        averages = "".join(f", {kind} {result['top1']:.4f}" for kind, result in results.items()
                           if kind != "raw")
        return (f"{where}: {loss_text} | val top1 {val['top1']:.4f}{averages} | "
                f"{stats['images_per_s']:.0f} img/s")
    text = (f"{where}: {loss_text} | val top1 {val['top1']:.4f}{top5_text(val['top5'])} loss "
            f"{val['loss']:.4f} on {val['num_samples']}"
            + "".join(f", {kind} top1 {result['top1']:.4f}" for kind, result in results.items()
                      if kind != "raw"))
    if stats["grad_norm"] is not None:
        text += f" | grad norm {stats['grad_norm']:.3g} (max {stats['grad_norm_max']:.3g})"
    if stats["overflow_steps"]:
        text += f", {stats['overflow_steps']} fp16 overflow steps skipped"
    return text + f" | {stats['images_per_s']:.1f} img/s"


def best_line(best: Optional[dict], path: str) -> str:
    """The end-of-run line naming the best weights, where they came from and on which split
    they were chosen (the test split under ``data.val_split: 0``: a biased number)."""
    chosen = ("chosen on the test split (data.val_split: 0), so this number is biased upward"
              if best.get("selected_on") == "test" else "chosen on the validation split")
    text = (f"best val top1 {best['val_top1']:.4f} ({best['kind']} weights, "
            f"{place(best['stage'], best['epoch'])}, {chosen})")
    if "test_top1" in best:
        text += f"; test top1 {best['test_top1']:.4f}{top5_text(best['test_top5'])}"
    return text + f"; weights in {path}"
