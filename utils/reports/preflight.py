"""What ``main.py --preflight`` prints: the table (or one JSON document) of its report, and on a
GPU of the plan's table the plan's rate beside each measured one."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Optional, TextIO

import paddle

from training.gpus import EFFICIENCY, GPUS, peak_flops
from training.plan import plan

if TYPE_CHECKING:
    from utils.schema import Config


def _human_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def _human_seconds(seconds):
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

    say(f"device {report['device']}, Paddle {report['paddle']}, {report['ranks']} rank(s), "
        f"{report['precision']}, attention {report['attention']}, recompute "
        f"{'on' if report['recompute'] else 'off'}")
    say(f"{'stage':>5} {'batch':>6} {'micro':>6} {'accum':>6} {'step':>9} {'img/s':>8} "
        f"{'steps/epoch':>12} {'epoch':>14}" + ("  plan img/s (ratio)" if report["card"] else ""))
    for entry in report["stages"]:
        planned = entry.get("plan_images_per_s")
        say(f"{entry['stage']:>5} {entry['batch_size']:>6} {entry['micro_batch']:>6} "
            f"{entry['accum_steps']:>6} {entry['step_s']:>8.3g}s "
            f"{entry['train_images_per_s']:>8.3g} {entry['steps_per_epoch']:>12} "
            f"{_human_seconds(entry['projected_epoch_s']):>14}"
            + (f"  {planned:.3g} ({entry['train_images_per_s'] / planned:.3g})"
               if planned else ""))
    if report["card"]:
        say(f"plan: {report['card']} at {EFFICIENCY:g} of its peak (training/gpus.py); a ratio "
            f"far from 1 is worth reporting, so the factor can be corrected")
    say(f"evaluation {report['eval_images_per_s']:.3g} img/s per rank; peak memory "
        f"{_human_bytes(report['peak_memory_bytes'])}; checkpoint "
        f"{_human_bytes(report['checkpoint_bytes'])}, disk needed about "
        f"{_human_bytes(report['disk_bytes'])}")
    loader = report["loader_images_per_s"]
    if loader is not None:
        wait = loader < report["train_images_per_s"]
        say(f"host loader {loader:.3g} img/s with {report['num_workers']} workers, "
            f"{_human_bytes(report['host_bytes_per_image'])} per image: "
            + ("slower than training, which will wait for it; raise data.num_workers"
               if wait else "faster than training, which will not wait for it"))
    say(f"projected: the whole recipe at its full length "
        f"{_human_seconds(report['projected_total_s'])} (preflight took "
        f"{report['preflight_s']:.0f} s)")


def plan_rates(report: dict, cfg: Config, device: str) -> None:
    """On a GPU of the plan's table: each stage's planned images per second beside the
    measurement (``plan_images_per_s``), and the card (``None`` elsewhere)."""
    card = gpu_card(device)
    report["card"] = card
    if card is None:
        return
    costs = plan(cfg)["stages"]
    for entry in report["stages"]:
        flops = costs[entry["stage"]]["flops_per_image"]
        entry["plan_images_per_s"] = peak_flops(card, cfg.train.amp) * EFFICIENCY / flops


def gpu_card(device: str) -> Optional[str]:
    """The card of :mod:`training.gpus` that ``device`` is (by name and memory), or ``None``."""
    if not str(device).startswith("gpu"):
        return None
    name = paddle.device.cuda.get_device_name()
    memory = paddle.device.cuda.get_device_properties().total_memory
    for card, (card_memory, _, _) in GPUS.items():
        if card.split("-")[0] in name and abs(memory - card_memory) < 0.15 * card_memory:
            return card
    return None
