"""Memory per image of an R-Drop training step, with and without activation recompute.

Each setting (recompute off/on, two batch sizes) runs one forward and backward pass of an
R-Drop step ([x; x], dropout on) in a fresh process and reports its peak memory: the peak of
Paddle's own allocator (the tensors: exact and repeatable), and beside it the process's
(on a GPU ``max_memory_allocated``, on a CPU the peak resident set, ``ru_maxrss``, which
also holds what the allocator cached and freed). The slope between the two batch sizes is
the memory per image; the fixed part (weights, gradients, the framework itself) cancels.
Prints one JSON line.

  python bench/memory.py                  # deit_b_distilled_384 at 384 px, random weights
  python bench/memory.py --quick          # the demo's tiny ViT, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REAL = {"config": "configs/rdrop_deit_b_384_cifar100.yaml", "batches": (1, 3),
        "overrides": ["model.pretrained=false"]}
QUICK = {"config": "configs/demo.yaml", "batches": (16, 64), "overrides": []}


def _child(config, overrides, batch, recompute):
    """One R-Drop step at ``batch`` images in this process; print its peak memory."""
    import numpy as np
    import paddle

    from data.preprocess import DevicePreprocess
    from losses import RDropLoss
    from models.build import build_model, input_size
    from training.config import load_config
    from utils.runtime.device import allocator_peaks, peak_memory_bytes, select_device

    device = select_device()
    cfg = load_config(config, [*overrides, f"model.recompute={str(recompute).lower()}",
                               "model.drop_rate=0.3"])
    paddle.seed(0)
    model = build_model(cfg.model, load_pretrained=False, image_size=cfg.data.image_size)
    model.train()
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    x = DevicePreprocess(input_size(model))(paddle.to_tensor(images))
    labels = paddle.to_tensor(np.arange(batch) % cfg.model.num_classes)
    RDropLoss(alpha=cfg.loss.alpha)(model(paddle.concat([x, x])), labels)["loss"].backward()
    print(json.dumps({"peak_bytes": allocator_peaks(device)["allocated"],
                      "process_peak_bytes": peak_memory_bytes(device), "device": device,
                      "paddle": paddle.__version__}))


def _measure(preset, recompute, batch):
    command = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(batch),
               "--config", preset["config"], *[a for o in preset["overrides"] for a in ("-o", o)]]
    if recompute:
        command.append("--recompute")
    proc = subprocess.run(command, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:  # out of memory, most often: its own last line says so
        from utils.errors import UserError

        said = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"the step at batch {batch} (recompute {recompute}) ended with exit "
                        f"code {proc.returncode}: {said}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> int:
    """Measure the four settings and print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's tiny model")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--recompute", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("-o", dest="override", action="append", default=[],
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.config, args.override, args.batch, args.recompute)
        return 0
    from utils.runtime.signals import hold_sigterm

    hold_sigterm(False)  # held for Paddle's import, which only the children make
    preset = QUICK if args.quick else REAL
    low, high = preset["batches"]
    result = {"model": preset["config"], "batches": [low, high]}
    for recompute, name in ((False, "plain"), (True, "recompute")):
        peaks = [_measure(preset, recompute, batch) for batch in (low, high)]
        result.update(device=peaks[0]["device"], paddle=peaks[0]["paddle"])
        for key, label in (("peak_bytes", ""), ("process_peak_bytes", "process_")):
            result[f"{name}_{label}peak_bytes"] = [p[key] for p in peaks]
            result[f"{name}_{label}bytes_per_image"] = (peaks[1][key]
                                                        - peaks[0][key]) / (high - low)
    for label in ("", "process_"):
        plain, recomputed = (result[f"{kind}_{label}bytes_per_image"]
                             for kind in ("plain", "recompute"))
        result[f"{label}recompute_over_plain"] = round(recomputed / plain, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from utils import cli

    cli.run(main)
