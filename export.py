"""Export trained weights for Paddle Inference: a static graph plus its preprocessing contract.

Examples:
  python export.py -c configs/demo.yaml                  # best weights -> OUTPUT_DIR/inference
  python export.py --weights PATH --out DIR              # any weights file of this model
  python predict.py -c configs/demo.yaml --model-dir DIR IMAGE...   # use the export
"""

from __future__ import annotations

import argparse
import glob
import os
from typing import Optional

from training.config import load_config
from utils import cli
from utils.cli import add_weights_option, config_parser
from utils.runtime.device import select_device

OUT_HELP = "where to write model.* and preprocess.json (default: train.output_dir/inference)"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options of the export entry point."""
    parser = config_parser(__doc__)
    add_weights_option(parser, "weights to export")
    parser.add_argument("--out", metavar="DIR", help=OUT_HELP)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Export and print the folder."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.override)
    from data.dataset import names_for_weights
    from models.build import input_size
    from models.inference import export_model
    from training.amp import Precision
    from training.trained import load_trained
    from utils.io.files import refuse_input_as_output

    model, weights = load_trained(cfg, Precision("off", select_device()), args.weights,
                                  args.config)
    out = args.out or os.path.join(cfg.train.output_dir, "inference")
    for target in [*glob.glob(os.path.join(out, "model.*")),
                   os.path.join(out, "preprocess.json")]:
        refuse_input_as_output(target, [weights, args.config], "--out")
    export_model(model, input_size(model), out,
                 names_for_weights(weights, cfg.data, cfg.model.num_classes),
                 cfg.data.crop_fraction, weights)
    print(f"exported to {out}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
