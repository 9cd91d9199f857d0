"""What R-Drop does on the demo: the same training with the KL term off (α = 0), at the
demo's α and at a larger one, over several seeds.

Every run is ``main.py`` itself (``-o loss.alpha=A -o train.seed=S``), so each arm trains
two dropout passes of every image and differs only in the KL's weight; α = 0 is therefore
cross-entropy on both passes, with the KL still measured. Each run goes to its own folder
under ``--out`` (a finished run is read back, not trained again, so an interrupted bench
continues where it stopped). Per arm, mean ± sample standard deviation over the seeds of:
test top-1 of the best weights, best validation top-1, the last epoch's training KL
(unweighted), and the train–validation gap (last epoch's validation loss minus its training
cross-entropy). Prints a Markdown table, then one JSON line (with the Paddle version and
the math libraries' settings the runs inherited).

  python bench/rdrop_effect.py                         # α 0, 1, 5; seeds 0-4 (about 17 min, 2 cores)
  python bench/rdrop_effect.py --alphas 0 1 --seeds 2  # quicker
  MKL_CBWR=COMPATIBLE python bench/rdrop_effect.py --alphas 1 --seeds 2 --out output/bench_mkl
                                                       # MKL's portable kernels, as another CPU's
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Settings that choose the CPU kernels a run computes with, and so its exact digits.
KERNEL_SETTINGS = ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "FLAGS_use_mkldnn")
MEASURES = {  # key: what the table's column says
    "test_top1": "test top-1 (best weights)",
    "val_top1": "best val top-1",
    "train_kl": "training KL (last epoch)",
    "gap": "val loss − train CE (last epoch)",
}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="configs/demo.yaml", help="the recipe")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 5.0],
                        help="KL weights to compare (default: 0, the demo's 1, and 5)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per α (default 5)")
    parser.add_argument("--out", default="output/bench_rdrop_effect",
                        help="parent folder of the runs (default output/bench_rdrop_effect)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an override passed to every run, e.g. -o stages.0.epochs=5")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (a standard deviation needs two runs)")
    return args


def train(args: argparse.Namespace, alpha: float, seed: int) -> str:
    """Train the run of ``alpha`` and ``seed`` (resume it when an earlier bench was stopped
    in it; a finished one is read back as it is); its folder. A stop (Ctrl-C, SIGTERM)
    reaches the run, which saves its checkpoint before the bench ends."""
    from utils.checkpoint import find_last
    from utils.errors import Interrupted, UserError

    folder = os.path.join(os.path.abspath(args.out), f"alpha_{alpha:g}", f"seed_{seed}")
    command = [sys.executable, os.path.join(ROOT, "main.py"), "-c", args.config,
               "-o", f"loss.alpha={alpha!r}", "-o", f"train.seed={seed}",
               "-o", f"train.output_dir={folder}"]
    for override in args.override:
        command += ["-o", override]
    if os.path.isdir(folder) and find_last(folder) is not None:
        command.append("--resume")  # an unfinished run continues; a finished one says so
    print(f"α = {alpha:g}, seed {seed}: {folder}", file=sys.stderr, flush=True)
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        code = run.wait()
    except KeyboardInterrupt as stop:  # Ctrl-C reached the run too; SIGTERM is passed on
        signum = getattr(stop, "signum", signal.SIGINT)
        run.send_signal(signum)  # within a second of the first: the same request
        run.wait()
        raise Interrupted(signum, f"{signal.Signals(signum).name} while training {folder}; "
                                  f"its checkpoint is kept: run the bench again to continue"
                          ) from None
    if code != 0:
        raise UserError(f"main.py ended with exit code {code} for α = {alpha:g}, seed {seed} "
                        f"(its error is above); fix it and run the bench again")
    return folder


def measures(folder: str) -> dict:
    """The measures of one finished run, from its best.json and metrics.jsonl; a damaged
    one is one error that says how to train it again."""
    from utils.errors import UserError
    from utils.io.files import read_json
    from utils.reports.plots import read_metrics

    try:
        best, last = read_json(os.path.join(folder, "best.json")), read_metrics(folder)[-1]
        return {"test_top1": float(best["test_top1"]), "val_top1": float(best["val_top1"]),
                "train_kl": float(last["train_kl"]),
                "gap": float(last["val_loss"]) - float(last["train_ce"])}
    except (UserError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise UserError(f"the finished run in {folder} has damaged results ({exc}); move the "
                        f"folder away (or delete it) to train it again") from None


def main(argv: Optional[list[str]] = None) -> int:
    """Train every (α, seed), print the table and the JSON line."""
    from utils.runtime.signals import hold_sigterm

    args = parse_args(argv)
    hold_sigterm(False)  # held for Paddle's import, which this process never makes
    started = time.time()
    arms = {}
    for alpha in args.alphas:
        runs = [measures(train(args, alpha, seed)) for seed in range(args.seeds)]
        arms[f"{alpha:g}"] = {key: {"mean": statistics.mean(run[key] for run in runs),
                                    "std": statistics.stdev(run[key] for run in runs),
                                    "runs": [run[key] for run in runs]}
                              for key in MEASURES}
    print("| α | " + " | ".join(MEASURES.values()) + " |")
    print("|---" * (len(MEASURES) + 1) + "|")
    for alpha, arm in arms.items():
        print(f"| {alpha} | " + " | ".join(f"{arm[key]['mean']:.4f} ± {arm[key]['std']:.4f}"
                                          for key in MEASURES) + " |")
    print(json.dumps({"config": args.config, "seeds": args.seeds, "overrides": args.override,
                      "paddle": paddle_version(), "date": time.strftime("%Y-%m-%d"),
                      "kernel_settings": {name: os.environ[name] for name in KERNEL_SETTINGS
                                          if name in os.environ},
                      "wall_s": round(time.time() - started, 1), "alphas": arms}))


def paddle_version() -> str:
    """The installed Paddle's version, read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("paddlepaddle", "paddlepaddle-gpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"
    return 0


if __name__ == "__main__":
    from utils import cli

    cli.run(main)
