"""Run logs: one JSON line per epoch in ``metrics.jsonl`` and VisualDL scalars under ``vdl/``.

VisualDL shows only the newest record file of a folder, and a new ``LogWriter`` starts a new
file: a resumed run would hide its own history. A run therefore writes one file,
``vdl/vdlrecords.run.log``; a resume first rewrites it (and any older files) with what came
before the checkpoint only, so the history is one, continuous and without the steps the
interrupted run did after its last checkpoint.
"""

import contextlib
import glob
import io
import numbers
import os
import shutil

from utils.errors import optional_output
from utils.io.files import json_text, open_unlinked, refuse_link

VDL_FILE = "vdlrecords.run.log"


def _quietly(function, *args, **kwargs):
    """VisualDL prints a line when it opens an existing file; a run's log does not need it."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def _scalars_before(vdl, steps, epochs):
    """The scalars in ``vdl``'s record files that lie before a checkpoint: training steps
    below ``steps``, epochs below ``epochs``; as ``(tag, step, value, walltime)``."""
    from visualdl import LogReader

    kept = []
    for path in sorted(glob.glob(os.path.join(vdl, "vdlrecords.*")), key=os.path.getmtime):
        reader = _quietly(LogReader, file_path=path)
        for tag in reader.get_tags().get("scalar", []):
            limit = steps if tag.startswith("train/") else epochs if tag.startswith("epoch/") \
                else 0
            kept += [(tag, r.id, r.value, r.timestamp) for r in reader.get_data("scalar", tag)
                     if r.id < limit]
    return kept


def _rewrite_history(vdl, steps, epochs):
    """Replace the record files in ``vdl`` by one holding what lies before a checkpoint
    (built beside it first, so an interruption never loses the old files)."""
    from visualdl import LogWriter

    history = _scalars_before(vdl, steps, epochs)
    partial = vdl + ".partial"
    refuse_link(partial)
    shutil.rmtree(partial, ignore_errors=True)
    writer = _quietly(LogWriter, logdir=partial, file_name=VDL_FILE)
    for tag, step, value, walltime in history:
        writer.add_scalar(tag=tag, value=value, step=step, walltime=walltime)
    writer.close()
    for path in glob.glob(os.path.join(vdl, "vdlrecords.*")):
        os.remove(path)
    os.replace(os.path.join(partial, VDL_FILE), os.path.join(vdl, VDL_FILE))
    shutil.rmtree(partial, ignore_errors=True)


class RunLogger:
    """Writes the per-epoch records and per-step training scalars of one run."""

    def __init__(self, output_dir: str, keep_records: int = 0, keep_steps: int = 0,
                 enabled: bool = True) -> None:
        """Start ``metrics.jsonl`` and the VisualDL log afresh, or keep their first
        ``keep_records`` epochs and ``keep_steps`` steps (a resume: what came after the
        checkpoint is dropped and runs again). ``enabled=False`` (ranks other than 0)
        writes nothing."""
        from visualdl import LogWriter

        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        kept = []
        if keep_records and os.path.isfile(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as handle:
                kept = handle.readlines()[:keep_records]
        with open_unlinked(self.metrics_path, "w") as handle:
            handle.writelines(kept)
        vdl = os.path.join(output_dir, "vdl")
        for path in (vdl, os.path.join(vdl, VDL_FILE)):
            refuse_link(path)
        self.writer = None  # VisualDL's scalars decorate the run: without them it goes on
        with optional_output("the VisualDL log (vdl/)"):
            if glob.glob(os.path.join(vdl, "vdlrecords.*")):
                _rewrite_history(vdl, keep_steps, keep_records)
            self.writer = _quietly(LogWriter, logdir=vdl, file_name=VDL_FILE)  # appends

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """One VisualDL scalar; a writer that fails is dropped after one warning line."""
        if self.writer is None:
            return
        written = False
        with optional_output("the VisualDL log (vdl/) from here on"):
            self.writer.add_scalar(tag=tag, value=value, step=step)
            written = True
        if not written:
            self.writer = None

    def log_step(self, step: int, values: dict) -> None:
        """Scalars of one optimizer step (``train/loss``, ``train/lr``, ...)."""
        if not self.enabled:
            return
        for name, value in values.items():
            self._scalar(f"train/{name}", float(value), step)

    def log_epoch(self, epoch_index: int, record: dict) -> None:
        """Append ``record`` to metrics.jsonl and mirror its numbers to VisualDL."""
        if not self.enabled:
            return
        with open_unlinked(self.metrics_path, "a") as handle:
            handle.write(json_text(record) + "\n")
        for name, value in record.items():
            if isinstance(value, numbers.Number) and not isinstance(value, bool):
                self._scalar(f"epoch/{name}", float(value), epoch_index)

    def log_test(self, record: dict) -> None:
        """Append a final test-split record (``{"test": "best"|"last", ...}``) to metrics.jsonl
        and VisualDL (``test/best_top1``, ...)."""
        if not self.enabled:
            return
        with open_unlinked(self.metrics_path, "a") as handle:
            handle.write(json_text(record) + "\n")
        for key in ("test_top1", "test_top5", "test_loss"):
            if record[key] is not None:  # no top-5 among at most five classes
                self._scalar(f"test/{record['test']}_{key[len('test_'):]}", float(record[key]),
                             0)

    def close(self) -> None:
        """Flush and close the VisualDL writer."""
        if self.enabled and self.writer is not None:
            with optional_output("the VisualDL log (vdl/)"):
                self.writer.close()
