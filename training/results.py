"""What a run reports: the best weights (raw, EMA or SWA) chosen on validation, the final
test of the best and the last weights, and what a non-finite step means for the run."""

from __future__ import annotations

from typing import Optional

from losses.parts import ALWAYS, NAMES
from training.state import KINDS
from utils.errors import UserError
from utils.reports.text import top5_text
from utils.schema import TrainConfig


def epoch_record(stage: int, epoch: int, step: int, lr: float, stats: dict, results: dict,
                 averages: dict) -> dict:
    """The ``metrics.jsonl`` record of an epoch (``epoch`` from 1 in its stage) or of the part
    of it since the last validation, at optimizer step ``step`` of the stage: the training
    means, the raw weights' validation and each kept average's top-1 (``None`` before its
    first update)."""
    val = results["raw"]
    record = {
        "stage": stage, "epoch": epoch, "step": step, "lr": lr,
        **{f"train_{part}": stats[part] for part in ALWAYS},
        "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
        "images_per_s": stats["images_per_s"], "grad_norm": stats["grad_norm"],
        "grad_norm_max": stats["grad_norm_max"], "overflow_steps": stats["overflow_steps"],
        **{f"train_{part}": stats[part] for part in NAMES if part not in ALWAYS and part in stats},
    }
    for kind in averages:
        record[f"val_top1_{kind}"] = results[kind]["top1"] if kind in results else None
    return record


def is_better(val: dict, best: Optional[dict]) -> bool:
    """A larger validation set supersedes a subset; on the same set, higher top-1 wins."""
    if best is None:
        return True
    return (val["num_samples"], val["top1"]) > (best["val_num_samples"], best["val_top1"])


def new_best(record: dict, results: dict, epoch_index: int, best: Optional[dict],
             selected_on: str) -> Optional[dict]:
    """The best record after this epoch if one of its kinds beats ``best`` (the raw weights
    win a tie, then EMA), else ``None``."""
    kind = max(results, key=lambda k: (results[k]["top1"], -KINDS.index(k)))
    if not is_better(results[kind], best):
        return None
    return dict(record, kind=kind, epoch_index=epoch_index, val_top1=results[kind]["top1"],
                val_num_samples=results[kind]["num_samples"], selected_on=selected_on)


def test_line(record: dict) -> str:
    """The console line of one final-test record."""
    return (f"test split, {record['test']} weights ({record['kind']}): top1 "
            f"{record['test_top1']:.4f}{top5_text(record['test_top5'])} loss "
            f"{record['test_loss']:.4f} on {record['num_samples']}")


def skip_nonfinite(train_cfg: TrainConfig, skipped: int, values: dict, stage_index: int,
                   step_place: str, last_checkpoint: Optional[str]) -> int:
    """The count of skipped steps after one more whose loss (or, when its ``values`` have a
    ``grad_norm``, gradient) is not finite at ``step_place``; one :class:`UserError` under
    ``train.nan_policy: stop`` or past ``train.nan_max_skips``."""
    norm = values["grad_norm"]
    what = "loss" if norm is None else "gradient"
    if "loss_scale" in values:  # fp16 loss scaling: its overflows were skipped down to here
        what += " (still at the minimum fp16 loss scale, so not an overflow)"
    where = (f"{step_place} (lr {values['lr']:.3g}, loss {values['loss']}"
             + ("" if norm is None else f", gradient norm {norm}") + ")")
    kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
            else "no checkpoint was saved yet")
    fix = (f"lower stages.{stage_index}.optimizer.lr, add a warmup "
           f"(stages.{stage_index}.warmup.steps) or set train.clip_grad_norm")
    if train_cfg.nan_policy == "stop":
        raise UserError(f"the {what} is not finite at {where}; {kept}; {fix}, or set "
                        f"train.nan_policy=skip to drop such steps")
    skipped += 1
    if skipped > train_cfg.nan_max_skips:
        raise UserError(f"{skipped} steps had a non-finite loss or gradient, more than "
                        f"train.nan_max_skips={train_cfg.nan_max_skips} (last at {where}); "
                        f"{kept}; {fix}")
    print(f"skipped the update of {where}: non-finite {what} "
          f"({skipped}/{train_cfg.nan_max_skips} allowed)", flush=True)
    return skipped
