"""Cost of an R-Drop training step relative to a plain cross-entropy step, in one run.

Times three steps (forward, backward, optimizer update) on the same model and batch:
  - rdrop_concat: R-Drop with one forward pass over [x; x] (what main.py does),
  - two_forwards: R-Drop with two separate forward passes (what the original did),
  - ce_only:      plain cross-entropy on one copy,
and prints one JSON line with the ratios and the bytes the host ships per image.

  python bench/step_ratio.py                       # the demo model and batch
  python bench/step_ratio.py -c configs/rdrop_deit_b_384_cifar100.yaml -o model.pretrained=false
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.config import load_config  # noqa: E402
from utils import cli  # noqa: E402  (quiets Paddle's import warning first)
from utils.cli import config_parser  # noqa: E402
from utils.runtime.device import select_device  # noqa: E402


def _step(model, optimizer, loss_fn, logits_fn, images, labels):
    parts = loss_fn(logits_fn(model, images), labels)
    parts["loss"].backward()
    optimizer.step()
    optimizer.clear_grad()
    return float(parts["loss"])  # waits for the device, so the timing is complete


def main(argv: Optional[list[str]] = None) -> int:
    """Measure and print the JSON line."""
    parser = config_parser(__doc__)
    parser.set_defaults(config="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.override)

    import paddle

    from data.dataset import ImageDataset, load_split
    from data.loader import build_loader
    from data.preprocess import DevicePreprocess
    from losses import CrossEntropyLoss, RDropLoss
    from models.build import build_model, input_size
    from training.optim import build_optimizer
    from utils.runtime.seeds import seed_everything

    device = select_device()
    seed_everything(cfg.train.seed)
    split, _ = load_split(cfg.data, "train", cfg.model.num_classes)
    model = build_model(cfg.model)
    loader = build_loader(ImageDataset(split, input_size(model), cfg.data, seed=cfg.train.seed),
                          cfg.data.batch_size, 0, train=True)
    batch_images, batch_labels = next(iter(loader))
    host_bytes = batch_images.numpy().nbytes / batch_images.shape[0]
    model.train()
    preprocess = DevicePreprocess(input_size(model))
    optimizer, _ = build_optimizer(cfg.stages[0], model, 1, cfg.train)
    rdrop = RDropLoss(alpha=cfg.loss.alpha, kl_reduction=cfg.loss.kl_reduction)
    variants = {
        "rdrop_concat": (rdrop, lambda m, x: m(paddle.concat([preprocess(x)] * 2))),
        "two_forwards": (rdrop, lambda m, x: paddle.concat([m(preprocess(x)), m(preprocess(x))])),
        "ce_only": (CrossEntropyLoss(), lambda m, x: m(preprocess(x))),
    }
    for loss_fn, logits_fn in variants.values():  # warm-up
        for _ in range(2):
            _step(model, optimizer, loss_fn, logits_fn, batch_images, batch_labels)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (loss_fn, logits_fn) in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                _step(model, optimizer, loss_fn, logits_fn, batch_images, batch_labels)
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "device": str(device), "model": cfg.model.name, "batch_size": cfg.data.batch_size,
        "image_size": preprocess.image_size,
        "step_s": {name: round(value, 5) for name, value in median.items()},
        "rdrop_concat_over_ce": round(median["rdrop_concat"] / median["ce_only"], 3),
        "two_forwards_over_ce": round(median["two_forwards"] / median["ce_only"], 3),
        "host_bytes_per_image": int(host_bytes),
    }))
    return 0


if __name__ == "__main__":
    cli.run(main)
