"""A training run as main.py and the notebook start it: the output folder held, a finished
run recognised, every missing download named at once, then the :class:`Trainer`."""

import os

from data.cifar import pending_download as cifar_download
from models.build import pending_download as weights_download
from training.state import finished
from training.trainer import Trainer
from utils.checkpoint import find_last, resume_folder, weights_path
from utils.errors import UserError
from utils.io.download import ensure_downloadable
from utils.reports.progress import one_output, set_mode as set_progress
from utils.reports.text import best_line
from utils.run_folder import RunFolder
from utils.runtime.device import select_device
from utils.runtime.dist import is_main


@one_output()
def fit(cfg, resume=None, overwrite=False):
    """Run every stage of ``cfg`` (from a checkpoint with ``resume``: True or a path),
    holding ``train.output_dir`` meanwhile; ``overwrite`` moves an earlier run there aside.
    Returns the best record (``None`` if no epoch was validated)."""
    select_device()  # first: it also takes SIGTERM back from Paddle's C++ handler
    set_progress(cfg.train.progress)
    out = cfg.train.output_dir
    done = None if resume or overwrite else complete_run(out, cfg)
    if done is not None:  # the same command again: its run is there, nothing to train
        print(f"the run in {out} is complete with this config (its final test is done); "
              f"nothing to train (--overwrite trains it again)", flush=True)
        print(best_line(done.best, weights_path(out, "best")), flush=True)
        return done.best
    folder = RunFolder(out)
    if is_main():
        folder.hold(resume=bool(resume), overwrite=overwrite)
    try:
        if resume:
            state = finished(resume_folder(resume, out), cfg)
            if state is not None:
                print(f"the run in {out} is complete (its final test is done); nothing to "
                      f"resume", flush=True)
                return state.best
        ensure_downloadable([item for item in (
            cifar_download(cfg.data), weights_download(cfg.model, load_pretrained=not resume))
            if item])
        best = Trainer(cfg, resume).fit()
    finally:
        folder.release()
    if best is not None:
        print(best_line(best, weights_path(out, "best")), flush=True)
    return best


def complete_run(out, cfg):
    """The state of a complete run of ``cfg`` (the same config, its final test done) in
    ``out``, or ``None`` (no run there, an unfinished one, or one of another config)."""
    folder = find_last(out) if os.path.isdir(out) else None
    if folder is None:
        return None
    try:
        return finished(folder, cfg)
    except UserError:  # another config, or damaged: the folder check says what it holds
        return None
