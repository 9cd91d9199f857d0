"""Loaders: per-rank batches (training sharded and shuffled by seed and epoch, resumable
at any batch), with workers that die with the training process."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import paddle
from paddle.io import DataLoader, DistributedBatchSampler

from data.samples import FAILED
from utils.errors import UserError
from utils.runtime.dist import die_with_parent, process_alive
from utils.runtime.seeds import derived_seed
from utils.runtime.signals import ignore_stop_signals

if TYPE_CHECKING:
    from data.samples import ImageDataset



class SampleErrorLoader(DataLoader):
    """A DataLoader that yields clean batches: a sample's error stops the training process
    with its own message, and the unreadable images skipped under
    ``data.skip_bad_images`` are not in them (one warning line per pass says how many).

    paddle.io re-raises a worker's exception in a background thread, which leaves the
    training process only "Blocking queue is killed" (a SystemError). The dataset therefore
    marks a failed sample by its label (``FAILED - index``) and its ``raise_failure`` raises
    the error again here. A skipped evaluation image is labelled -1 and left out here; a
    skipped training image was already replaced by the next readable one.
    """

    def __iter__(self) -> Iterator[tuple[paddle.Tensor, paddle.Tensor]]:
        batches = super().__iter__()
        left_out = 0
        try:
            while True:
                try:
                    images, labels = next(batches)
                except StopIteration:
                    break
                except SystemError as exc:  # Paddle's word for a worker that died
                    if "Blocking queue is killed" not in str(exc):
                        raise
                    raise UserError("a data loader worker died (killed by the system, perhaps "
                                    "out of memory); lower data.num_workers or "
                                    "data.batch_size, or look for an image that needs too "
                                    "much memory") from None
                values = labels.numpy().reshape(-1)
                if values.min() <= FAILED:
                    self.dataset.raise_failure(FAILED - int(values.min()))
                if values.min() < 0:  # -1: unreadable and skipped (data.skip_bad_images)
                    keep = np.flatnonzero(values >= 0)
                    left_out += len(values) - len(keep)
                    if not len(keep):
                        continue
                    # On the host: Paddle has no uint8 index_select (the images' type).
                    images = paddle.to_tensor(images.numpy()[keep])
                    labels = paddle.to_tensor(labels.numpy()[keep])
                yield images, labels
        except GeneratorExit:  # a pass stopped midway (a validation inside the epoch)
            self._report_skipped(left_out)
            raise
        self._report_skipped(left_out)

    def _report_skipped(self, left_out: int) -> None:
        skipped = self.dataset.take_skipped()
        if left_out:
            print(f"warning: {left_out} unreadable images left out of this pass over "
                  f"{len(self.dataset)} images", flush=True)
        elif skipped:
            print(f"warning: {skipped} unreadable training images were replaced by the next "
                  f"readable ones in this pass", flush=True)



class WindowedBatchSampler(DistributedBatchSampler):
    """DistributedBatchSampler that yields only batches ``start .. stop-1`` of an epoch.

    ``start`` skips the batches a resumed epoch already did, without loading them;
    ``stop`` drops the micro-batches that would not fill a gradient accumulation.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start, self.stop = 0, None

    def full_length(self) -> int:
        """Batches in a whole epoch."""
        return super().__len__()

    def __iter__(self):
        stop = self.full_length() if self.stop is None else self.stop
        for index, batch in enumerate(super().__iter__()):
            if index >= stop:
                break
            if index >= self.start:
                yield batch

    def __len__(self):
        stop = self.full_length() if self.stop is None else self.stop
        return max(stop - self.start, 0)


def less_than_a_batch(images: int, batch_size: int) -> UserError:
    """The error for a training split of ``images`` that gives no whole batch of
    ``batch_size`` (on this rank)."""
    return UserError(f"the training split has {images} images, fewer than one batch of "
                     f"{batch_size}; lower data.batch_size")


def build_loader(dataset: ImageDataset, batch_size: int, num_workers: int,
                 train: bool) -> SampleErrorLoader:
    """A DataLoader over ``dataset``; training shuffles and drops the last partial batch.

    Training batches are sharded across ranks (DistributedBatchSampler); evaluation
    loaders get a dataset already sharded by :func:`eval_loader` and take all of it.
    """
    shard = {} if train else {"num_replicas": 1, "rank": 0}
    sampler = WindowedBatchSampler(dataset, batch_size=batch_size, shuffle=train,
                                   drop_last=train, **shard)
    if train and len(sampler) == 0:
        raise less_than_a_batch(len(dataset), batch_size)
    init = None
    if num_workers:
        init = functools.partial(_init_worker, os.getpid())
        _end_workers_at_exit()
    return SampleErrorLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                             worker_init_fn=init)


@functools.cache
def _end_workers_at_exit():
    """At this process's exit, kill the loader workers still running (an iteration cut short
    by a stop or an error): they ignore SIGTERM, with which multiprocessing's own exit would
    end them, and would hold the exit forever. Registered after multiprocessing's exit
    function, so it runs first."""
    atexit.register(_kill_workers)


def _kill_workers():
    # Paddle's SIGCHLD handler would report each killed worker as a failed loader.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()


def _init_worker(parent, worker_id):
    """Workers die with the training process (without it, the workers of a run killed with
    kill -9 live on for minutes) and leave stop signals to it: the signal that reaches the
    whole process group (Ctrl-C, paddle.distributed.launch's SIGTERMs) must not kill them
    before the training process has saved its checkpoint.

    Under the ``forkserver`` or ``spawn`` start methods (``forkserver`` is Python 3.14's
    default) a worker's parent is the server the training process started, which dies with
    it: the worker is tied to that server, once the training process is known to live."""
    server = os.getppid()
    if server != parent and not process_alive(parent):
        os._exit(1)  # the training process died before this worker started
    die_with_parent(server)
    ignore_stop_signals()



def set_epoch(loader: paddle.io.DataLoader, epoch: int, start: int = 0) -> None:
    """Select ``epoch``'s shuffle order and augmentation draws (both derived from the seed),
    beginning at batch ``start``."""
    dataset = loader.dataset
    dataset.set_epoch(epoch)
    loader.batch_sampler.set_epoch(derived_seed(dataset.seed, epoch))
    loader.batch_sampler.start = start


def loader_rate(loader: paddle.io.DataLoader, seconds: Optional[float] = None) -> float:
    """Images per second that ``loader`` delivers after its first batch (which starts its
    workers), over its epoch or at most ``seconds``; ``None`` for a single batch."""
    images, start = 0, None
    for batch, _ in loader:
        if start is None:
            start = time.perf_counter()
        else:
            images += batch.shape[0]
        if seconds is not None and images and time.perf_counter() - start >= seconds:
            break
    return images / (time.perf_counter() - start) if images else None
