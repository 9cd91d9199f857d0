"""Evaluate trained weights on the whole test split (or the validation split): top-1, top-5
and loss, per sample, written to val_metrics.json (val_metrics_val.json for --split val).

Examples:
  python val.py                                  # best checkpoint of the reproduction
  python val.py -c configs/demo.yaml             # best checkpoint of the CPU demo
  python val.py --kind ema                       # the last checkpoint's EMA weights
  python val.py --weights output/demo/last/raw.safetensors   # any weights file of this model
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Optional

from training.config import load_config
from utils import cli
from utils.cli import add_weights_option, config_parser
from utils.errors import UserError, optional_output
from utils.reports.progress import one_output
from utils.reports.text import top5_text
from utils.run_folder import CHART_FILES, RESULT_FILES
from utils.runtime.device import select_device


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options of the evaluation entry point."""
    parser = config_parser(__doc__)
    add_weights_option(parser, "weights to evaluate: .safetensors, or .pdparams read without "
                               "running code")
    parser.add_argument("--plot", action="store_true",
                        help="also write per_class_top1.png (a bar per class; "
                             "per_class_top1_val.png for --split val) next to the results")
    parser.add_argument("--kind", choices=("raw", "ema", "swa"),
                        help="evaluate the last checkpoint's raw weights, EMA or SWA average "
                             "instead of the best weights")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the test split (default), or the validation split (the images "
                             "held out with data.val_split, or the data's own val/)")
    return parser.parse_args(argv)


def _kept_average(output_dir, kind):
    """Whether the run in ``output_dir`` kept the average ``kind`` (its own config says; a
    folder without one is given the benefit of the doubt)."""
    from utils.yaml_text import read_yaml

    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return True
    train = read_yaml(path).get("train")  # a damaged file: the benefit of the doubt too
    section = train.get(kind) if isinstance(train, dict) else None
    return not isinstance(section, dict) or section.get("enabled", True) is not False


@one_output()
def main(argv: Optional[list[str]] = None) -> int:
    """Evaluate and write ``val_metrics.json`` next to the checkpoints."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.override)
    from data.dataset import eval_loader, names_for_weights, run_splits, validation_source
    from data.preprocess import DevicePreprocess
    from models.build import input_size
    from training.amp import Precision
    from training.engine import evaluate
    from training.trained import load_trained
    from utils.checkpoint import weights_path
    from utils.io.files import ensure_folder, write_json
    from utils.io.tensor_io import record_of
    from utils.reports.progress import set_mode as set_progress

    out = cfg.train.output_dir
    if args.weights and args.kind:
        raise UserError("give --weights or --kind, not both")
    if args.kind in ("ema", "swa") and not _kept_average(out, args.kind):
        raise UserError(f"--kind {args.kind}: {args.kind.upper()} is off in the run in {out} "
                        f"(train.{args.kind}.enabled: false in its config.yaml), so it kept no "
                        f"such average; use --kind raw, or the best weights")
    precision = Precision(cfg.train.amp, select_device(), cfg.train.amp_level)
    model, weights = load_trained(cfg, precision, args.weights or (
        weights_path(out, args.kind) if args.kind else None), args.config)
    set_progress(cfg.train.progress)
    _, val, test, _ = run_splits(cfg.data, cfg.model.num_classes, cfg.train.seed)
    if args.split == "val" and validation_source(cfg.data) == "test":
        raise UserError("--split val: this config holds out no validation images "
                        "(data.val_split: 0, and the data has no validation split of its "
                        "own), so validation was the test split")
    class_names = names_for_weights(weights, cfg.data, cfg.model.num_classes)
    size = input_size(model)
    result = evaluate(model, DevicePreprocess(size),
                      eval_loader(test if args.split == "test" else val, cfg.data, size),
                      cfg.model.num_classes, precision=precision)
    if not math.isfinite(result["loss"]):
        raise UserError(f"the weights {weights} give a non-finite loss ({result['loss']}) on the "
                        f"{args.split} split: they hold non-finite values or overflow")
    report = {
        "weights": os.path.abspath(weights), "split": args.split,
        "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
        "num_samples": result["num_samples"],
        "per_class_top1": dict(zip(class_names, result["per_class_top1"])),
    }
    write_json(os.path.join(ensure_folder(out, "train.output_dir"), RESULT_FILES[args.split]),
               report)
    if args.plot:
        from utils.reports.plots import plot_per_class

        with optional_output(CHART_FILES[args.split]):
            print(plot_per_class(report["per_class_top1"], os.path.join(out, CHART_FILES[args.split]),
                                 f"per-class top-1 of {os.path.basename(weights)} on the "
                                 f"{args.split} split (top-1 {result['top1']:.4f})"),
                  flush=True)
    chosen = record_of(weights).get("selected_on")
    if chosen == "test" and args.split == "test":
        print("note: these weights were chosen on the test split (data.val_split: 0); this "
              "top-1 is biased upward", flush=True)
    print(f"top1={result['top1']:.4f}{top5_text(result['top5'], ' top5={:.4f}')} "
          f"loss={result['loss']:.4f} "
          f"n={result['num_samples']} on the {args.split} split", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
