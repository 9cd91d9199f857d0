"""Training throughput: this project's step against a faithful copy of the original loop.

Both loops train the same model (same initial weights) on the same real images (the
digits demo, 32×32 RGB uint8: CIFAR's 3,072 bytes per image), with the same batch size,
the R-Drop loss and AdamW; each measurement is images/s over timed steps after warm-up,
data loading included:
  - ours:      uint8 batches, bicubic resize + normalisation on the device, ONE forward
               over [x; x], AMP (fp16/bf16 where the device has it), fused attention (auto);
  - seed loop: the original's loader (PIL bicubic resize to the model's size, ToTensor,
               Normalize in the DataLoader), float32, TWO forward passes.
One JSON line per (batch size, AMP mode). On a GPU it adds MFU: achieved FLOP/s (6 × the
forward FLOPs per image: two copies, backward ≈ 2× forward) over the device's peak.

  python bench/throughput.py --quick   # the demo's tiny ViT at 64 px on the CPU, < 2 minutes
  python bench/throughput.py           # deit_b_distilled_384 at 384 px, batch 32/64/128, fp16 + bf16
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Iterator, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.config import load_config  # noqa: E402
from utils import cli  # noqa: E402  (quiets Paddle's import warning first)
from utils.cli import config_parser  # noqa: E402
from utils.runtime.device import select_device  # noqa: E402

if TYPE_CHECKING:
    import paddle

    from utils.schema import Config

QUICK = {"config": "configs/demo.yaml", "overrides": ["model.kwargs.img_size=64"],
         "batch_sizes": [32], "amp": ["off"], "steps": 10}
FULL = {"config": "configs/rdrop_deit_b_384_cifar100.yaml", "overrides": [],
        "batch_sizes": [32, 64, 128], "amp": ["fp16", "bf16"], "steps": 20}


def _seed_loader(images, labels, size, batch_size, workers):
    """The original's input pipeline: PIL bicubic resize and normalisation per image on the CPU."""
    import paddle.vision.transforms as T
    from paddle.io import DataLoader, Dataset

    transform = T.Compose([T.Resize((size, size), interpolation="bicubic"), T.ToTensor(),
                           T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])

    class Resized(Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, index):
            from PIL import Image

            return transform(Image.fromarray(images[index])), labels[index]

    return DataLoader(Resized(), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=workers)


def _images_per_s(step, loader, batch_size, warmup, steps):
    """Run ``warmup`` then ``steps`` steps over ``loader`` (cycled); images per second."""
    def batches() -> Iterator[tuple]:
        while True:
            yield from loader

    source = batches()
    for _ in range(warmup):
        step(*next(source))
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(source))
    return batch_size * steps / (time.perf_counter() - start)


def measure(cfg: Config, batch_size: int, amp: str, steps: int, warmup: int, workers: int,
            device: str) -> tuple[float, float, paddle.nn.Layer, str]:
    """``(ours, seed loop)`` images/s and the model, for one batch size and AMP mode."""
    import paddle

    from data.dataset import ImageDataset
    from data.digits import load_digits
    from data.loader import build_loader
    from losses import RDropLoss
    from models.build import build_model, input_size
    from training.amp import Precision
    from training.engine import train_step
    from training.grads import apply_update, trainable
    from training.stage import Stage

    images, labels = load_digits("train")
    criterion = RDropLoss(alpha=cfg.loss.alpha)
    precision = Precision(amp, device)
    models = []
    for mode in (precision.mode, "off"):  # ours (maybe fused), then the seed loop's
        paddle.seed(cfg.train.seed)
        models.append(build_model(cfg.model, load_pretrained=False, amp=mode))
    ours, seed = models
    size = input_size(ours)
    optimizers = [paddle.optimizer.AdamW(learning_rate=1e-5, parameters=m.parameters())
                  for m in models]
    stage = Stage.of_parts(ours, criterion, size=size, precision=precision)
    params = trainable(ours)

    def our_step(batch: paddle.Tensor, target: paddle.Tensor) -> None:
        parts = train_step(stage, batch, target)
        apply_update(optimizers[0], params, precision, cfg.train.clip_grad_norm)
        optimizers[0].clear_grad()
        float(parts["loss"])  # wait for the device

    def seed_step(batch: paddle.Tensor, target: paddle.Tensor) -> None:
        logits = paddle.concat([seed(batch), seed(batch)])  # two forward passes
        parts = criterion(logits, target)
        parts["loss"].backward()
        optimizers[1].step()
        optimizers[1].clear_grad()
        float(parts["loss"])

    our_loader = build_loader(ImageDataset((images, labels), size, cfg.data, seed=cfg.train.seed),
                              batch_size, workers, train=True)
    ours.train()
    seed.train()
    ours_rate = _images_per_s(our_step, our_loader, batch_size, warmup, steps)
    seed_rate = _images_per_s(seed_step, _seed_loader(images, labels, size, batch_size, workers),
                              batch_size, warmup, steps)
    return ours_rate, seed_rate, ours, precision.mode


def main(argv: Optional[list[str]] = None) -> int:
    """Measure and print one JSON line per batch size and AMP mode."""
    parser = config_parser(__doc__)
    parser.set_defaults(config=None)
    parser.add_argument("--quick", action="store_true",
                        help="the demo's tiny ViT at 64 px, batch 32, float32: a CPU check")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="per-step batch sizes")
    parser.add_argument("--amp", nargs="+", choices=("off", "fp16", "bf16"),
                        help="precisions of our loop (the seed loop is always float32)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loops")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense half-precision peak, for MFU (default: by name)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    cfg = load_config(args.config or preset["config"],
                      [*preset["overrides"], *args.override, "model.pretrained=false"])

    import paddle

    from models.build import input_size
    from models.cost import forward_flops
    from planning.gpus import HALF_PEAKS
    from planning.plan import model_shape

    device = select_device()
    name = paddle.device.cuda.get_device_name() if device.startswith("gpu") else "cpu"
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else
            next((flops for key, flops in HALF_PEAKS.items() if key in name), None))
    for batch_size in args.batch_sizes or preset["batch_sizes"]:
        for amp in args.amp or preset["amp"]:
            ours, seed, model, used = measure(cfg, batch_size, amp, args.steps or preset["steps"],
                                              warmup=args.warmup, workers=args.workers,
                                              device=device)
            # The plan's count (tested against the operations a forward pass runs): an R-Drop
            # training image is two copies of a forward and its backward (about twice it).
            flops = 6 * forward_flops(model_shape(cfg.model, input_size(model)))
            print(json.dumps({
                "device": name, "paddle": paddle.__version__, "model": cfg.model.name,
                "image_size": input_size(model), "batch_size": batch_size, "amp": used,
                "images_per_s": round(ours, 2), "seed_loop_images_per_s": round(seed, 2),
                "speedup_over_seed_loop": round(ours / seed, 3),
                "train_gflops_per_image": round(flops / 1e9, 2),
                "mfu": round(ours * flops / peak, 4) if peak and device.startswith("gpu") else None,
            }), flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
