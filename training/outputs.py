"""What a run writes to its folder besides the logs: the resume checkpoint, the best
weights, the final test of the best and last weights, and the stop it reports."""

import signal

from data.dataset import eval_loader
from models.build import input_size
from training.optim import portable_optimizer_state
from training.results import new_best, test_best_and_last, test_line
from training.state import checkpoint_trees
from utils.checkpoint import find_last, save_best, save_last, weights_path, write_best_json
from utils.errors import Interrupted
from utils.reports.text import place
from utils.runtime.dist import is_main


class RunOutputs:
    """The part of :class:`training.trainer.Trainer` that writes its folder: it uses the
    trainer's config, state, model, averages, optimizer, logger and stop requests."""

    def _final_test(self):
        """Evaluate the best and the last weights on the test split, once, at the end:
        records in metrics.jsonl, the best's numbers in best.json."""
        if self.state.tested:
            return
        best = self.state.best
        loader = eval_loader(self.test, self.cfg.data, input_size(self.model))
        for record in test_best_and_last(self.model, self.preprocess, loader,
                                         self.cfg.model.num_classes, self.precision, best,
                                         weights_path(self.out, "best")):
            self.logger.log_test(record)
            print(test_line(record), flush=True)
            if record["test"] == "best":
                best.update({k: record[k] for k in ("test_top1", "test_top5", "test_loss")})
                if is_main():
                    write_best_json(self.out, best, self.class_names)
        self.state.tested = True
        self._checkpoint(self.state.position, None)

    def _keep_best(self, record, results):
        """Save the best of the raw, EMA and SWA weights if it beats the best so far."""
        best = new_best(record, results, self.state.epoch_index, self.state.best,
                        "test" if self.validation == "test" else "val")
        if best is None:
            return
        self.state.best = best
        if best["kind"] == "raw":
            weights = dict(self.model.state_dict(), **self.masters.by_path(self.optimizer))
        else:
            weights = self.averages[best["kind"]].state_dict()
        if is_main():
            save_best(self.out, weights, best, self.class_names)

    def _interrupted(self, here):
        """The :class:`Interrupted` to raise once the stop checkpoint is saved."""
        return Interrupted(self.stops.signum or signal.SIGTERM,
                           f"{self.stops.requested or 'SIGTERM'} at "
                           f"{place(here.stage, here.epoch + 1)} (step "
                           f"{self.state.global_step}); checkpoint saved in "
                           f"{find_last(self.out)}")

    def _checkpoint(self, position, progress):
        """Write the resume checkpoint for ``position`` (the next thing to do) with the
        progress of the epoch it stops in (``None`` at an epoch's start)."""
        self.state.position, self.state.progress = position, progress
        self.state.updates = {kind: avg.updates for kind, avg in self.averages.items()}
        optimizer = (portable_optimizer_state(self.model, self.optimizer)
                     if self.optimizer is not None else self.restored["optimizer"])
        if is_main():
            save_last(self.out, checkpoint_trees(self.model, optimizer, self.averages,
                                                 self.precision), self.state.to_json(),
                      self.class_names)
