"""Host-side image loading: decoded images per second per loader worker, and whether the
accelerator would wait for the host.

Writes ``--images`` 500x375 JPEGs (``data.sample_photos``: crops of scikit-learn's sample
photos, the size of a typical web photo) to a temporary folder and measures:
  - one worker's work, in this process: decode + the training view (random-resized crop,
    flip) and decode + the evaluation view (resize, centre crop), at 384 px (the
    reproduction) and 32 px (the demo), images/s;
  - a training DataLoader at 384 px with 1 and 2 workers, images/s;
  - listing a folder of ``--list-files`` empty .jpg files, files/s (and so a million);
  - the demo's training rate on this machine (preflight of configs/demo_folder.yaml).
Then, for each training rate (the demo's, measured; the reproduction's on a GPU, an
estimate unless given with ``--gpu-images-per-s``, e.g. a preflight's img/s on that GPU),
the workers one training process needs so that training does not wait. Prints a table and
one JSON line.

  python bench/loader.py
  python bench/loader.py --gpu-images-per-s 40   # a rate measured by --preflight on your GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import cli  # noqa: E402  (first: it quiets Paddle's import warning)

# The reproduction's R-Drop training rate on one V100, estimated: DeiT-B at 384 px infers
# 85.9 images/s on a V100 (Touvron et al. 2021, Table 1); a training step of R-Drop costs
# about 6 forward passes per image (two copies, each forward + backward ~ 3 forwards).
DEIT_B_384_V100_INFERENCE = 85.9
RDROP_TRAINING_COST = 6


def _rate(function, count, seconds=2.0):
    """Calls of ``function(i)`` per second, for at least ``seconds`` (i cycles over count)."""
    done, start = 0, time.perf_counter()
    while done < count or time.perf_counter() - start < seconds:
        function(done % count)
        done += 1
    return done / (time.perf_counter() - start)


def _decode_rate(folder):
    """Images/s of one worker decoding the JPEGs, nothing else."""
    from data.images import image_files, read_rgb

    files = image_files(folder)
    return _rate(lambda i: read_rgb(files[i]), len(files))


def _view_rates(folder, size):
    """Images/s of one worker: decode + training view, decode + evaluation view."""
    import numpy as np

    from data.augment import eval_view, train_view
    from data.images import image_files, read_rgb

    files = image_files(folder)
    crop = {"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]}
    rng = np.random.default_rng(0)
    return {
        "train_view": _rate(lambda i: train_view(read_rgb(files[i]), rng, size, crop=crop,
                                                 hflip_prob=0.5), len(files)),
        "eval_view": _rate(lambda i: eval_view(read_rgb(files[i]), size), len(files)),
    }


def _loader_rate(cfg, workers):
    """Images/s of the training loader of ``cfg`` with ``workers`` workers, after its first
    batch (which starts them)."""
    from data.dataset import run_splits, stage_loaders
    from data.loader import loader_rate, set_epoch

    train, val, _, _ = run_splits(cfg.data, cfg.model.num_classes, 0)
    cfg.data["num_workers"] = workers
    loader, _ = stage_loaders(cfg.data, 0, 1, cfg.data.image_size, train, val)
    set_epoch(loader, 0)
    return loader_rate(loader)


def _listing_rate(count):
    """Files per second that a folder data set is listed at (empty files: nothing is read)."""
    from data.folders import folder_split
    from utils.schema import DataConfig

    with tempfile.TemporaryDirectory(prefix="bench-list-") as root:
        for number in range(count):
            folder = os.path.join(root, "train", f"class_{number % 10}")
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, f"{number:07d}.jpg"), "wb").close()
        start = time.perf_counter()
        folder_split(DataConfig(path=root), "train", [f"class_{i}" for i in range(10)])
        return count / (time.perf_counter() - start)


def main(argv: Optional[list[str]] = None) -> int:
    """Measure; print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="training JPEGs written")
    parser.add_argument("--list-files", type=int, default=20_000, help="files in the listing")
    parser.add_argument("--gpu-images-per-s", type=float, help="the reproduction's training "
                        "rate on your GPU (default: the V100 estimate above)")
    args = parser.parse_args(argv)
    from data.sample_photos import CLASSES, PHOTO_SIZE, write_sample_folder
    from preflight import preflight
    from training.config import load_config
    from utils.runtime.signals import reassert_handlers

    reassert_handlers()  # Paddle is imported: SIGTERM is a one-line stop from here on

    per_class = max(args.images // len(CLASSES), 1)
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as root:
        write_sample_folder(root, {"train": per_class, "test": per_class})
        decode = _decode_rate(os.path.join(root, "train"))
        views = {size: _view_rates(os.path.join(root, "train"), size) for size in (384, 32)}
        cfg = load_config("configs/rdrop_deit_b_384_folder.yaml",
                          [f"data.path={root}", f"model.num_classes={len(CLASSES)}",
                           f"data.batch_size={max(min(16, per_class * len(CLASSES) // 4), 1)}"])
        loaders = {workers: _loader_rate(cfg, workers) for workers in (1, 2)}
        batch = min(32, per_class * len(CLASSES) // 2)  # the demo's, or two steps of a few
        demo = preflight(load_config("configs/demo_folder.yaml",
                                     [f"data.path={root}", f"data.batch_size={batch}"]))
    listing = _listing_rate(args.list_files)
    gpu = args.gpu_images_per_s or DEIT_B_384_V100_INFERENCE / RDROP_TRAINING_COST
    needs = {
        "demo (tiny ViT, 32 px, this CPU, measured)": (demo["train_images_per_s"], 32),
        "reproduction (deit_b_distilled_384, one GPU, "
        + ("given" if args.gpu_images_per_s else "V100 estimate") + ")": (gpu, 384),
    }
    workers = {name: math.ceil(rate / views[size]["train_view"])
               for name, (rate, size) in needs.items()}
    print(f"photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG; one worker, images/s: decode only "
          f"{decode:.0f}")
    for size, rates in views.items():
        print(f"  {size:>3} px: decode + training view {rates['train_view']:.0f}, decode + "
              f"evaluation view {rates['eval_view']:.0f}")
    print("training loader at 384 px: " + ", ".join(f"{w} worker(s) {r:.0f} img/s"
                                                    for w, r in loaders.items()))
    print(f"listing a folder: {listing:,.0f} files/s ({1e6 / listing:.1f} s for a million)")
    for name, (rate, _) in needs.items():
        print(f"{name}: trains {rate:.1f} img/s; needs {workers[name]} worker(s) to keep up")
    print(json.dumps({"decode_images_per_s": decode, "views_images_per_s": views, "loader_images_per_s": loaders,
                      "listing_files_per_s": listing, "training_images_per_s":
                      {name: rate for name, (rate, _) in needs.items()},
                      "workers_needed": workers, "cpu_count": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    cli.run(main)
