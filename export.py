"""Export trained weights for Paddle Inference: a static graph plus its preprocessing contract.

Examples:
  python export.py -c configs/demo.yaml                  # best weights -> OUTPUT_DIR/inference
  python export.py --weights PATH --out DIR              # any weights file of this model
  python predict.py -c configs/demo.yaml --model-dir DIR IMAGE...   # use the export
"""

import os

from utils import cli
from utils.config import config_parser, load_config


def parse_args(argv=None):
    """Command-line options of the export entry point."""
    parser = config_parser(__doc__)
    parser.add_argument("--weights", metavar="PATH",
                        help="weights to export (default: best.safetensors in train.output_dir)")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write model.* and preprocess.json "
                             "(default: train.output_dir/inference)")
    return parser.parse_args(argv)


def main(argv=None):
    """Export and print the folder."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.override)
    from data.dataset import class_names
    from models.build import build_trained, input_size, trained_weights
    from models.inference import export_model
    from training.amp import Precision

    weights = trained_weights(cfg.train.output_dir, args.weights, args.config)
    model = build_trained(cfg, weights, Precision("off", cli.select_device()))
    out = args.out or os.path.join(cfg.train.output_dir, "inference")
    export_model(model, input_size(model), out, class_names(cfg.data, cfg.model.num_classes))
    print(f"exported to {out}", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
