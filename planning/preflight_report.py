"""Preflight's report (``main.py --preflight``): the measured steps, memory and times of a
run beside what the plan counted for them, as a table or one JSON document."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Optional, TextIO

from models.attention import AMP_DTYPES, sdpa_kernel
from planning.gpus import SOURCE, card_of, flop_rates
from planning.plan import activation_plan, attention_disagreement, plan
from training.engine import STOP_AGREEMENT_BATCHES
from training.recipe import StageLength, stage_data

if TYPE_CHECKING:
    from training.amp import Precision
    from training.stage_check import StageCheck
    from utils.schema import Config


def human_bytes(count: float) -> str:
    """``count`` bytes in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def human_seconds(seconds: float) -> str:
    """``seconds`` as ``H h MM min`` or ``M min SS s``."""
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def print_report(report: dict, as_json: bool = False, out: TextIO = None) -> None:
    """The table (or the JSON document) of :func:`preflight`, to ``out`` (standard output)."""
    out = out or sys.stdout
    if as_json:
        print(json.dumps(report), file=out, flush=True)
        return

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    attention = report["attention"]
    planned = "fused" if attention["planned"]["fused"] else "not fused"
    say(f"device {report['device']}, Paddle {report['paddle']}, {report['ranks']} rank(s), "
        f"{report['precision']}, attention {attention['observed']['described']} (counted in "
        f"the stage check; the plan assumed {planned}), "
        f"recompute {'on' if report['recompute'] else 'off'}")
    say(f"{'stage':>5} {'batch':>6} {'micro':>6} {'accum':>6} {'step':>9} {'img/s':>8} "
        f"{'steps/epoch':>12} {'epoch':>14}" + ("  plan img/s (ratio)" if report["card"] else ""))
    for entry in report["stages"]:
        planned = entry.get("plan_images_per_s")
        say(f"{entry['stage']:>5} {entry['batch_size']:>6} {entry['micro_batch']:>6} "
            f"{entry['accum_steps']:>6} {entry['step_s']:>8.3g}s "
            f"{entry['train_images_per_s']:>8.3g} {entry['steps_per_epoch']:>12} "
            f"{human_seconds(entry['projected_epoch_s']):>14}"
            + (f"  {planned:.3g} ({entry['train_images_per_s'] / planned:.3g})"
               if planned else ""))
    for entry in report["stages"]:
        held = entry["activation_bytes_per_image"]
        measured = ("not measured (this Paddle cannot reset its allocator's peak)"
                    if held["observed"] is None else
                    f"measured {human_bytes(held['observed'])} ({held['ratio']:.2f} of it)")
        say(f"stage {entry['stage']}: activations per training image: the plan counts "
            f"{human_bytes(held['planned'])}, {measured}")
    if report["card"]:
        say(f"plan: {report['card']}'s rate in planning/gpus.py ({SOURCE}); a ratio far "
            f"from 1 is worth reporting, so the rate can be corrected")
    reserved = report["peak_reserved_bytes"]
    say(f"evaluation {report['eval_images_per_s']:.3g} img/s per rank; peak memory "
        f"{human_bytes(report['peak_memory_bytes'])} in tensors"
        + (f", {human_bytes(reserved)} held by Paddle's allocator" if reserved else "")
        + f" (after the stage check); checkpoint "
        f"{human_bytes(report['checkpoint_bytes'])}, disk needed about "
        f"{human_bytes(report['disk_bytes'])}")
    loader = report["loader_images_per_s"]
    if loader is not None:
        wait = loader < report["train_images_per_s"]
        say(f"host loader {loader:.3g} img/s with {report['num_workers']} workers, "
            f"{human_bytes(report['host_bytes_per_image'])} per image: "
            + ("slower than training, which will wait for it; raise data.num_workers"
               if wait else "faster than training, which will not wait for it"))
    late = report["stop_s"] > report["launcher_grace_s"]
    say(("warning: " if late else "") + f"a stop request is done within about "
        f"{report['stop_s']:.3g} s here (the longest step, {STOP_AGREEMENT_BATCHES} "
        f"evaluation batches and the checkpoint)" + (
            f": longer than the {report['launcher_grace_s']} s paddle.distributed.launch "
            f"waits after its SIGTERM before its SIGKILL, so a run stopped through the "
            f"launcher loses the work since its last checkpoint; stop the ranks themselves "
            f"(kill -TERM RANK_PIDS), or lower train.save_every_steps to lose less"
            if late else ""))
    say(f"projected: the whole recipe at its full length "
        f"{human_seconds(report['projected_total_s'])} (preflight took "
        f"{report['preflight_s']:.0f} s)")


def plan_rates(report: dict, cfg: Config, device: str) -> None:
    """On a GPU of the plan's table: each stage's planned images per second beside the
    measurement (``plan_images_per_s``), and the card (``None`` elsewhere)."""
    card = card_of(device)
    report["card"] = card
    if card is None:
        return
    costs = plan(cfg)["stages"]
    for entry in report["stages"]:
        flops = costs[entry["stage"]]["flops_per_image"]
        entry["plan_images_per_s"] = flop_rates(card, cfg.train.amp)[1] / flops


def attention_report(cfg: Config, check: StageCheck, device: str,
                      precision: Precision) -> dict:
    """The attention as the plan assumed it on ``device`` and as the stage check counted it:
    the calls that took the fused kernel (and, by Paddle's rule, which kernel), their
    dtypes, why others took PPIM's computation, and the line where the two disagree."""
    kernel = sdpa_kernel(str(device), AMP_DTYPES[precision.mode])
    return {"planned": {"fused": check.planned_fused,
                        "kernel": kernel if check.planned_fused else None},
            "observed": {**check.attention.to_json(), "described": check.attention.describe(),
                         "kernel_by_paddles_rule": kernel if check.attention.fused else None},
            "disagreement": attention_disagreement(cfg, str(device), check.planned_fused,
                                                   check.attention)}


def activations_report(cfg: Config, entry: dict, step_bytes: Optional[int], fused: bool,
                        precision: Precision) -> None:
    """Beside ``entry`` (a timed stage setup): the activation bytes per training image the plan
    counts for this precision and the attention the stage check counted, and what the timed
    steps held beyond what was allocated before them, per image of a micro-batch (``None``
    where this Paddle cannot reset its allocator's peak: 2.6)."""
    level = None if precision.mode == "off" else cfg.train.amp_level
    planned = activation_plan(cfg, entry["stage"], level, fused)
    observed = None if step_bytes is None else step_bytes / entry["micro_batch"]
    entry["activation_bytes_per_image"] = {
        "planned": planned, "observed": observed,
        "ratio": None if observed is None else observed / planned}


def project(report: dict, cfg: Config, splits: tuple, eval_ips: float) -> None:
    """Fill in each stage's projected epoch time and the total at the stages' lengths (the
    epoch caps, or the steps), validations included; ``splits``: the train, validation and
    test splits as ``(images, labels)``, ``eval_ips``: evaluation images per second."""
    train, val, test = splits
    kinds = 1 + cfg.train.ema.enabled + cfg.train.swa.enabled
    total = 0.0
    for entry in report["stages"]:
        stage = cfg.stages[entry["stage"]]
        data_cfg = stage_data(cfg.data, stage)
        images = data_cfg.train_subset or len(train[1])
        steps = images // entry["batch_size"]
        val_images = data_cfg.val_subset or len(val[1])
        validation_s = kinds * val_images / eval_ips
        entry["steps_per_epoch"] = steps
        entry["projected_epoch_s"] = steps * entry["step_s"] + validation_s
        length = StageLength.of(stage, max(steps, 1))
        every = cfg.train.eval_every_steps
        validations = length.epochs + (length.steps // every if every else 0)
        total += length.steps * entry["step_s"] + validations * validation_s
    report["projected_epoch_s"] = report["stages"][0]["projected_epoch_s"]
    report["projected_total_s"] = total + 2 * len(test[1]) / eval_ips
