"""Run logs: one JSON line per epoch in ``metrics.jsonl`` and VisualDL scalars under ``vdl/``."""

import numbers
import os

from utils.files import json_text


class RunLogger:
    """Writes the per-epoch records and per-step training scalars of one run."""

    def __init__(self, output_dir, keep_records=0, enabled=True):
        """Start ``metrics.jsonl`` afresh, or keep its first ``keep_records`` lines (a resume:
        lines of epochs after the checkpoint are dropped, those epochs run again).
        ``enabled=False`` (ranks other than 0) writes nothing."""
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
        with open(self.metrics_path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        self.writer = LogWriter(logdir=os.path.join(output_dir, "vdl"))

    def log_step(self, step, values):
        """Scalars of one optimizer step (``train/loss``, ``train/lr``, ...)."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(tag=f"train/{name}", value=float(value), step=step)

    def log_epoch(self, epoch_index, record):
        """Append ``record`` to metrics.jsonl and mirror its numbers to VisualDL."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json_text(record) + "\n")
        for name, value in record.items():
            if isinstance(value, numbers.Number) and not isinstance(value, bool):
                self.writer.add_scalar(tag=f"epoch/{name}", value=float(value), step=epoch_index)

    def close(self):
        """Flush and close the VisualDL writer."""
        if self.enabled:
            self.writer.close()
