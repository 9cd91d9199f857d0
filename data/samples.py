"""The samples a loader yields: uint8 views of a split's images as the host ships them, with
their labels; unreadable images stopped on or skipped."""

from __future__ import annotations

import multiprocessing
import sys
from typing import TYPE_CHECKING, Optional

import numpy as np
from paddle.io import Dataset

from data.augment import eval_view, train_view
from data.sources import FileImages, as_source
from utils.errors import UserError

if TYPE_CHECKING:
    from data.sources import Split
    from utils.schema import DataConfig

# Labels at or below this mark a sample whose loading failed: FAILED - index.
FAILED = -2


class ImageDataset(Dataset):
    """The samples of a :class:`Split` (or ``(uint8 array, labels)``) as the host sends them:
    uint8 ``[S, S, 3]`` views (:mod:`data.augment`; S is the source's ``ship_size`` for a
    model of ``size``) and labels.

    With ``augment`` (``{crop, hflip_prob, rotation}``) each sample's view is drawn from a
    generator seeded by ``(seed, epoch, index)``, so an epoch is the same whatever the number
    of workers and whichever worker loads the sample; without it the evaluation view.

    An image that cannot be read stops the run, or with ``data.skip_bad_images`` is one
    warning line (once per file in a run, whichever worker meets it) and counted
    (:meth:`take_skipped`): a training sample (``replace_bad``) is then the next readable
    one, an evaluation sample gets label -1, which the loader (:mod:`data.loader`) leaves out.
    """

    def __init__(self, split: Split, size: int, data_cfg: DataConfig, seed: int = 0,
                 augment: Optional[dict] = None, replace_bad: bool = False) -> None:
        super().__init__()
        images, self.labels = split
        self.images = as_source(images)
        self.size = self.images.ship_size(size)
        self.crop_fraction, self.augment = data_cfg.crop_fraction, augment
        self.seed, self.epoch, self.replace_bad = seed, 0, replace_bad
        self.skip_bad = data_cfg.skip_bad_images
        if self.skip_bad:  # shared with the loader's worker processes
            self.skipped = multiprocessing.Value("q", 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def take_skipped(self) -> int:
        """The unreadable images met since the last call (0 without ``data.skip_bad_images``)."""
        if not self.skip_bad:
            return 0
        with self.skipped.get_lock():
            count, self.skipped.value = self.skipped.value, 0
        return count

    def __getitem__(self, index):
        try:
            return self._sample(int(index))
        except Exception:  # noqa: BLE001 - raised again in the training process (data.loader):
            # an exception let out of here hangs Paddle's loader for good with num_workers: 0
            return np.zeros((self.size, self.size, 3), np.uint8), np.int64(FAILED - int(index))

    def raise_failure(self, index: int) -> None:
        """Raise, in this process, the error that sample ``index`` met in a loader worker,
        as one :class:`UserError`."""
        name = self.images.name(index)
        try:
            self._sample(index)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - MemoryError, a decoder's bug: one line
            message = " ".join(str(exc).split())[:200]
            raise UserError(f"{name} could not be prepared ({type(exc).__name__}: {message}); "
                            f"data.skip_bad_images=true leaves out images that fail") from None
        raise UserError(f"{name} could not be read in a loader worker")

    def _sample(self, index):
        """Sample ``index`` as :meth:`__getitem__` returns it, or the :class:`UserError` of
        an image that cannot be read (or, skipping those, of a split with none readable)."""
        image, label = self._read(index, report=True), self.labels[index]
        if image is None and not self.replace_bad:
            return np.zeros((self.size, self.size, 3), np.uint8), np.int64(-1)
        follower = index
        while image is None:
            follower = (follower + 1) % len(self)
            if follower == index:
                raise UserError(f"none of the {len(self)} images of this split can be read")
            image, label = self._read(follower, report=False), self.labels[follower]
        if self.augment is None:
            return eval_view(image, self.size, self.crop_fraction), label
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return train_view(image, rng, self.size, crop_fraction=self.crop_fraction,
                          **self.augment), label

    def _read(self, index, report):
        """Image ``index``, or ``None`` when it cannot be read and bad images are skipped
        (``report``: this is the sample's own file, to warn about and count)."""
        try:
            return self.images.read(index)
        except UserError as exc:
            if not self.skip_bad:
                raise UserError(f"{exc}; remove it or set data.skip_bad_images=true") from None
            if report:
                with self.skipped.get_lock():
                    self.skipped.value += 1
                if self.images.first_failure(index):
                    print(f"warning: skipped {exc}", file=sys.stderr, flush=True)
            return None


def shipping_line(dataset: ImageDataset, num_workers: int) -> str:
    """What the host sends the device per training image, and who prepares it."""
    side = dataset.size
    source = "decoded from files" if isinstance(dataset.images, FileImages) else "from memory"
    workers = f"{num_workers} loader workers" if num_workers else "the training process"
    return (f"host -> device: uint8 {side}x{side}x3 = {side * side * 3:,} bytes per image, "
            f"{source} by {workers}")
