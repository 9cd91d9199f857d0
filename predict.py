"""Classify image files with trained weights, or with a model exported by export.py.

Examples:
  python predict.py -c configs/demo.yaml digit.png                # best weights of the demo
  python predict.py photos/ "more/*.jpg" --topk 3 --json out.json # folders and globs
  python predict.py -c configs/demo.yaml --model-dir output/demo/inference digit.png
PNG, JPEG, BMP, GIF, TIFF, WebP and PPM/PGM/PBM images of any size up to 40 megapixels are
converted to RGB and prepared as evaluation prepares them (the shorter side resized to
data.image_size / data.crop_fraction, bicubic, the centre cropped, normalised). The class
names are those the weights carry. A file that cannot be read is skipped with a warning; the
run then ends with an error after the others.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

from training.config import load_config
from utils import cli
from utils.cli import add_weights_option, config_parser
from utils.runtime.device import select_device

if TYPE_CHECKING:
    import numpy as np
    import paddle


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options of the prediction entry point."""
    parser = config_parser(__doc__)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE",
                        help="image files, folders (searched recursively) or glob patterns")
    add_weights_option(parser, "weights to use")
    parser.add_argument("--model-dir", metavar="DIR",
                        help="use the model exported there (paddle.inference) instead")
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="classes per image")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the predictions as JSON (- for standard output, the "
                             "per-image lines then go to standard error); a stopped run "
                             "(Ctrl-C, SIGTERM, SIGHUP) still writes the images done")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Print the top-k classes of each image (and write them as JSON with ``--json``; with
    ``--json -`` the JSON alone goes to standard output, every other line to standard
    error)."""
    args = parse_args(argv)
    json_out = sys.stdout
    if args.json != "-":
        return _main(args, json_out)
    with contextlib.redirect_stdout(sys.stderr):
        return _main(args, json_out)


def _main(args, json_out):
    cfg = load_config(args.config, args.override)
    from data.dataset import names_for_weights
    from data.images import find_images
    from data.preprocess import DevicePreprocess
    from utils.errors import Interrupted, UserError
    from utils.io.files import check_writable, refuse_input_as_output

    if args.topk < 1:
        raise UserError("--topk must be at least 1")
    if args.json and args.json != "-":  # before the work, not after it
        check_writable(args.json, "--json")
    files = find_images(args.inputs)
    if args.json and args.json != "-":
        refuse_input_as_output(args.json, [*files, args.config, *filter(None, [args.weights])],
                               "--json")
    device = select_device()
    if args.model_dir:
        from models.inference import ExportedModel

        exported = ExportedModel(args.model_dir)
        print(exported.describe(args.model_dir), flush=True)
        size, names = exported.contract["image_size"], exported.contract["class_names"]
        crop_fraction = exported.contract["crop_fraction"]

        def run(images: paddle.Tensor) -> np.ndarray:
            return exported(images.numpy())
    else:
        from models.build import input_size
        from training.amp import Precision
        from training.trained import load_trained

        model, weights = load_trained(cfg, Precision("off", device), args.weights, args.config)
        size, crop_fraction = input_size(model), cfg.data.crop_fraction
        names = names_for_weights(weights, cfg.data, cfg.model.num_classes)

        def run(images: paddle.Tensor) -> np.ndarray:
            return model(images).numpy()
    preprocess = DevicePreprocess(size)
    results = []
    try:
        _predict(files, Classifier(run, preprocess, size, crop_fraction, names), args.topk,
                 results)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: keep what is done
        if not args.json:
            raise
        _write_results(args.json, results, json_out)
        raise Interrupted(getattr(stop, "signum", signal.SIGINT),
                          f"the {len(results)} of {len(files)} images done are in "
                          f"{'standard output' if args.json == '-' else args.json}") from None
    skipped = len(files) - len(results)
    if args.json:
        _write_results(args.json, results, json_out)
    if skipped:
        raise UserError(f"{skipped} of {len(files)} images could not be read (warnings above); "
                        f"the other {len(results)} were predicted"
                        + (f" and written to {args.json}" if args.json else ""))
    return 0


def _write_results(target, results, json_out):
    """The predictions as JSON: to the file ``target``, or to ``json_out`` for ``-``."""
    from utils.io.files import json_text, write_json

    if target == "-":
        print(json_text(results, indent=2), file=json_out, flush=True)
    else:
        write_json(target, results)


class Classifier(NamedTuple):
    """What turns an image file into class probabilities: ``run`` (the model on a
    preprocessed batch, as NumPy logits), the device ``preprocess`` and evaluation's view
    (``size``, ``crop_fraction``), and the class ``names``."""

    run: Callable
    preprocess: Callable
    size: int
    crop_fraction: float
    names: list


def _predict(files: list, classifier: Classifier, topk: int, results: list) -> None:
    """Append each readable image's top-k to ``results`` and print its line."""
    import numpy as np
    import paddle

    from data.augment import eval_view
    from data.images import read_rgb
    from utils.errors import UserError
    from utils.io.files import shown

    run, preprocess, size, crop_fraction, names = classifier
    with paddle.no_grad():
        for path in files:
            try:
                image = eval_view(read_rgb(path), size, crop_fraction)
            except UserError as exc:  # the others still get their predictions
                print(f"warning: skipped {exc}", file=sys.stderr, flush=True)
                continue
            logits = run(preprocess(paddle.to_tensor(image[None])))[0].astype(np.float64)
            if len(logits) != len(names) or not np.all(np.isfinite(logits)):
                raise UserError(f"the model gives {len(logits)} logits (finite: "
                                f"{bool(np.all(np.isfinite(logits)))}) for {len(names)} class "
                                f"names; are the weights and the config of one model?")
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = np.argsort(-probs, kind="stable")[:topk]
            results.append({"file": path, "topk": [
                {"index": int(i), "class": names[i], "prob": float(probs[i])} for i in top]})
            print(f"{shown(path)}: " + ", ".join(f"{t['class']} {t['prob']:.4f}"
                                          for t in results[-1]["topk"]), flush=True)


if __name__ == "__main__":
    cli.run(main)
