"""What a run is doing, typed: its position, the progress of its current epoch and the run
state a checkpoint's ``state.json`` holds, each with a JSON round trip; and the checks a
resume makes of a checkpoint against the config it is resumed with.

The JSON form is the one ``state.json`` has on disk, declared once by the dataclasses'
fields and checked key by key from them (:func:`check_json`) before it is read.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from losses.parts import ALWAYS, NAMES
from training.config import CONFIG
from utils.checkpoint import STATE, load_last
from utils.config import to_plain, validate
from utils.errors import UserError
from utils.reports.text import place
from utils.runtime.dist import all_sum, is_main
from utils.schema import Config, StageConfig

if TYPE_CHECKING:
    import paddle

    from training.amp import Precision
    from training.averaging import WeightAverage

# The kinds of weights a run keeps, by the name they have everywhere (records, best.json,
# the checkpoint's files, val.py --kind): the trained weights and their two averages.
KINDS = ("raw", "ema", "swa")


# A key that checkpoints written before it existed lack (its default then applies).
LATER = {"later": True}


def check_json(kind: type, data: Any, key: str = "the state") -> None:
    """Raise :class:`ValueError` naming the first key of ``data``, the JSON form of the
    dataclass ``kind`` (:class:`RunState` for ``state.json``), that is missing or of the
    wrong kind, as the fields declare them: an ``int`` is a count (an integer >= 0), a
    ``float`` a finite number, a nested dataclass is checked the same way; a ``dict`` field's
    metadata names its keys (``keys``) or the kind of its values (``values``), ``later``
    marks a key older checkpoints lack and ``says`` the words of its error."""
    _check_value(data, kind, key, {})


def _check_value(value, hint, key, meta):
    if typing.get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    wrong = None
    if dataclasses.is_dataclass(hint):
        _check_mapping(value, key, [f.name for f in dataclasses.fields(hint)
                                    if not f.metadata.get("later")])
        hints = typing.get_type_hints(hint)
        for item in dataclasses.fields(hint):
            if item.name in value:
                _check_value(value[item.name], hints[item.name],
                             item.name if key == "the state" else f"{key}.{item.name}",
                             item.metadata)
    elif hint is dict:
        _check_mapping(value, key, list(meta.get("keys", ())))
        for name, kind in meta.get("keys", {}).items():
            _check_value(value[name], kind, f"{key}.{name}", {"says": meta["says"]}
                         if "says" in meta else {})
        if "values" in meta:
            for name, item in value.items():
                _check_value(item, meta["values"], f"{key}.{name}", {})
    elif hint is int and (type(value) is not int or value < 0):
        wrong = f"'{key}' must be a count (an integer >= 0), got {value!r}"
    elif hint is float and (type(value) not in (int, float) or not math.isfinite(value)):
        wrong = f"'{key}' must be a finite number, got {value!r}"
    elif hint is bool and not isinstance(value, bool):
        wrong = f"'{key}' must be true or false"
    elif hint is str and not isinstance(value, str):
        wrong = f"'{key}' must be a string, got {value!r}"
    if wrong:
        raise ValueError(meta.get("says", wrong[:160]))


def _check_mapping(value, key, required):
    if not isinstance(value, dict):
        raise ValueError(f"'{key}' must be a mapping, got {type(value).__name__}")
    missing = [name for name in required if name not in value]
    if missing:
        raise ValueError(f"'{key}' lacks {', '.join(missing)}")


@dataclass
class Position:
    """The next thing a run does: micro-batch ``micro`` of epoch ``epoch`` of stage ``stage``
    (all from 0); ``evaluating`` when that epoch is trained but not yet validated. Stage
    ``len(stages)`` is the end of the run."""

    stage: int = 0
    epoch: int = 0
    micro: int = 0
    evaluating: bool = field(default=False, metadata=LATER)

    def to_json(self) -> dict:
        """The JSON form (``evaluating`` only when set)."""
        data = {"stage": self.stage, "epoch": self.epoch, "micro": self.micro}
        return dict(data, evaluating=True) if self.evaluating else data

    @classmethod
    def from_json(cls, data: dict) -> Position:
        """The position a :meth:`to_json` dict describes (other keys are ignored)."""
        return cls(data["stage"], data["epoch"], data["micro"], data.get("evaluating", False))

    def in_words(self, stages: list[StageConfig]) -> str:
        """Where a checkpoint at this position resumes, in words."""
        if self.stage >= len(stages):
            return "after the last stage (training complete, the final test follows)"
        text = place(self.stage, self.epoch + 1, stages[self.stage].epochs)
        if stages[self.stage].steps:
            text += f" (a stage of {stages[self.stage].steps} optimizer steps)"
        if self.evaluating:
            return text + ", its evaluation"
        return text + (f", after micro-batch {self.micro}" if self.micro else ", its start")


@dataclass
class EpochProgress:
    """Where an epoch stands: micro-batches done, samples seen, loss sums, seconds spent, and
    the optimizer steps: applied, skipped for an fp16 overflow, and their gradient norms.

    ``excluded`` counts the samples of non-finite losses, left out of the sums. Saved in
    mid-epoch checkpoints so that a resumed epoch reports the same means.
    """

    micro: int = 0
    seen: int = 0
    sums: dict = field(default_factory=lambda: dict.fromkeys(ALWAYS, 0.0),
                       metadata={"values": float})
    elapsed: float = 0.0
    excluded: int = 0
    steps: int = field(default=0, metadata=LATER)
    overflow_steps: int = field(default=0, metadata=LATER)
    grad_norm_sum: float = field(default=0.0, metadata=LATER)
    grad_norm_max: Optional[float] = field(default=None, metadata=LATER)

    def __post_init__(self):
        self.sums = dict(self.sums)  # never the caller's (a checkpoint's) dict

    def to_json(self) -> dict:
        """A JSON-ready copy."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> EpochProgress:
        """The progress a :meth:`to_json` dict describes (other keys are ignored)."""
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    def add_step(self, grad_norm: float) -> None:
        """Count one applied optimizer step and its gradient norm (before clipping)."""
        self.steps += 1
        self.grad_norm_sum += grad_norm
        self.grad_norm_max = max(grad_norm, self.grad_norm_max or 0.0)

    def summed(self) -> EpochProgress:
        """This progress with sample counts and loss sums added over all ranks (what a
        checkpoint and the epoch record hold). Step counts and gradient norms are the same
        on every rank (gradients are all-reduced before they are measured)."""
        names = NAMES  # the same list on every rank, whichever have summed a part yet
        totals = all_sum([self.seen, self.excluded, *(self.sums.get(n, 0.0) for n in names),
                          *(n in self.sums for n in names)])
        sums, present = totals[2:2 + len(names)], totals[2 + len(names):]
        return EpochProgress(**dict(self.to_json(), seen=int(totals[0]),
                                    excluded=int(totals[1]),
                                    sums={n: float(v) for n, v, here in zip(names, sums, present)
                                          if here}))

    def resumed(self) -> EpochProgress:
        """The progress a rank resumes this (summed, saved) progress with: rank 0 carries the
        sums of all ranks, the others restart theirs from zero; every rank takes the step
        counts."""
        if is_main():
            return EpochProgress.from_json(self.to_json())
        return EpochProgress(micro=self.micro, elapsed=self.elapsed, steps=self.steps,
                             overflow_steps=self.overflow_steps,
                             grad_norm_sum=self.grad_norm_sum, grad_norm_max=self.grad_norm_max)

    def means(self) -> dict[str, Optional[float]]:
        """Per-sample means of the finite loss parts (``None`` when every loss was not
        finite), images per second, the mean and largest gradient norm of the applied steps
        (``None`` without any) and the overflow count."""
        counted = self.seen - self.excluded
        result = {name: total / counted if counted else None for name, total in self.sums.items()}
        result["images_per_s"] = self.seen / self.elapsed if self.elapsed > 0 else 0.0
        result["grad_norm"] = self.grad_norm_sum / self.steps if self.steps else None
        result["grad_norm_max"] = self.grad_norm_max
        result["overflow_steps"] = self.overflow_steps
        return result


@dataclass
class RunState:
    """Everything but tensors that a resume needs: the position, the data epochs begun (their
    seeds), the records written (epochs, and validations inside them), the optimizer steps
    done, the steps skipped for a non-finite loss, the best record so far, the progress of
    an epoch stopped midway, the averages' update counts, the config, whether the final
    test is done, the distillation teacher's weights file and SHA-256, and the fingerprint of
    the data it trains on (:func:`data.dataset.data_identity`)."""

    config: dict
    position: Position = field(default_factory=Position)
    epoch_index: int = 0
    records: int = field(default=0, metadata=LATER)
    global_step: int = 0
    skipped_steps: int = 0
    best: Optional[dict] = field(default=None, metadata={"keys": {
        "val_top1": float, "val_num_samples": int, "kind": str, "stage": int, "epoch": int}})
    progress: Optional[EpochProgress] = None
    updates: dict = field(default_factory=dict, metadata={"values": int})
    tested: bool = field(default=False, metadata=LATER)
    teacher: Optional[dict] = field(default=None, metadata={
        **LATER, "keys": {"weights": str, "sha256": str},
        "says": "'teacher' must name a weights file and its sha256"})
    data: Optional[str] = field(default=None, metadata={
        **LATER, "says": "'data' must be the data's fingerprint or null"})

    def to_json(self) -> dict:
        """The JSON form ``state.json`` holds."""
        return {"position": self.position.to_json(), "epoch_index": self.epoch_index,
                "records": self.records,
                "global_step": self.global_step, "skipped_steps": self.skipped_steps,
                "best": self.best, "progress": self.progress and self.progress.to_json(),
                "updates": dict(self.updates), "config": self.config, "tested": self.tested,
                "teacher": self.teacher, "data": self.data}

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        """The state ``state.json`` describes (:func:`check_json` first: a :class:`ValueError`
        names a missing or wrong key); keys it does not know are ignored."""
        check_json(cls, data)
        return cls(config=data["config"], position=Position.from_json(data["position"]),
                   epoch_index=data["epoch_index"],
                   records=data.get("records", data["epoch_index"]),
                   global_step=data["global_step"],
                   skipped_steps=data["skipped_steps"], best=data["best"],
                   progress=(EpochProgress.from_json(data["progress"])
                             if data["progress"] is not None else None),
                   updates=dict(data["updates"]), tested=data.get("tested", False),
                   teacher=data.get("teacher"), data=data.get("data"))


def checkpoint_trees(model: paddle.nn.Layer, optimizer_state: dict,
                     averages: dict[str, WeightAverage], precision: Precision) -> dict:
    """The tensors of a resume checkpoint by file name: the raw weights, the optimizer's
    portable state, each average, and the fp16 loss scaler's state when it scales."""
    trees = {"raw": model.state_dict(), "optimizer": optimizer_state}
    trees.update({kind: average.state_dict() for kind, average in averages.items()})
    if precision.scaling:
        trees["scaler"] = precision.scaler.state_dict()
    return trees


# Keys that may change between a run and its resume without changing the results.
# nan_policy and nan_max_skips matter only once a loss is not finite, where the old policy
# would have stopped or skipped (a resume after such a stop may relax them). The stage
# check runs on scratch state and leaves the run as it was. Deterministic kernels change
# the last bits of a GPU run, not its recipe.
RESUMABLE_CHANGES = ("data.num_workers", "train.save_every_steps", "train.output_dir",
                     "train.nan_policy", "train.nan_max_skips", "train.progress",
                     "train.check_stages", "train.deterministic")
# Read only at a run's start: a resume reads the checkpoint's weights instead, so the file may
# be gone (an archived run passed to --init-from). A run called complete must match them.
START_ONLY = ("model.pretrained",)


def last_started_stage(position: Position) -> int:
    """The last stage that has trained at ``position`` (-1: none): a position at the very
    start of a stage (written when the stage before it ended) has not started that one."""
    started = position.epoch or position.micro or position.evaluating
    return position.stage if started else position.stage - 1


def _swa_stage(plain):
    swa = plain["train"]["swa"]
    return swa["stage"] % len(plain["stages"]) if swa["enabled"] else None


def check_same_config(state: RunState, cfg: Config, folder: str,
                      resuming: bool = True) -> list[int]:
    """A resume must use the config the checkpoint was trained with (but for the keys that
    change nothing of the results, and when ``resuming`` those read only at the start),
    except in the stages that have not started yet: those may be corrected, added or
    removed. Returns the indices of the later stages that differ."""
    saved = saved_config(state.config)
    if saved is None:  # a config this version no longer accepts: compared as it was saved
        saved = state.config
    current = to_plain(cfg)
    saved_stages, stages = saved.get("stages"), current["stages"]
    done = last_started_stage(state.position) + 1  # the stages that have trained
    if isinstance(saved_stages, list):  # a position past them: check_position says damaged
        done = min(done, len(saved_stages))
    changed = first_difference({**saved, "stages": None}, {**current, "stages": None},
                               RESUMABLE_CHANGES + (START_ONLY if resuming else ()))
    if changed is None and not (isinstance(saved_stages, list) and len(saved_stages) >= done
                                and len(stages) >= done):
        changed = "stages"
    for index in range(done if changed is None else 0):
        changed = changed or first_difference(saved_stages[index], stages[index],
                                              path=f"stages.{index}")
    if changed is None and done and _swa_stage(saved) != _swa_stage(current):
        changed = "train.swa.stage (through the number of stages)"
    if changed:
        raise UserError(f"the checkpoint in {folder} was trained with another config "
                        f"('{changed}' differs); resume with the same -c/-o (stages that "
                        f"have not started may change)")
    return [index for index in range(done, max(len(saved_stages), len(stages)))
            if index >= len(saved_stages) or index >= len(stages)
            or saved_stages[index] != stages[index]]


def saved_config(raw: Any) -> Optional[dict]:
    """A config a run saved (``state.json``'s, a run folder's ``config.yaml``) as this
    version reads it, for :func:`first_difference`: validated, keys added to the schema
    since with their defaults, in plain form; ``None`` when this version no longer accepts
    it. A resume and the commands that use a run's weights (val, predict, export, a
    teacher) read a saved config through this, the one comparison of configs."""
    try:
        return to_plain(validate(raw, CONFIG))
    except UserError:
        return None


def value_at(plain: Any, key: str) -> Any:
    """The value at the dotted ``key`` of a plain config (``None`` where it is absent)."""
    for part in key.split("."):
        plain = plain.get(part) if isinstance(plain, dict) else None
    return plain


def first_difference(saved: Any, current: Any, ignore: tuple = (),
                     path: str = "") -> Optional[str]:
    """The first dotted key whose value differs between two plain configs (``ignore`` skipped)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if sub not in ignore:
                found = first_difference(saved.get(key), current.get(key), ignore, sub)
                if found:
                    return found
        return None
    return None if saved == current else path


def check_position(state: RunState, trees: dict, stages: list[StageConfig], folder: str) -> None:
    """A resume state that the config's ``stages`` could have written, with the files it
    needs and finite weights; one :class:`UserError` otherwise."""
    # A stage budgeted in steps has at most one epoch per step (its epochs are counted once
    # the data is loaded, where the trainer checks the position again).
    position, problem = state.position, None
    epochs = [s.epochs or s.steps for s in stages]
    if position.stage > len(stages) or (position.stage < len(stages)
                                        and position.epoch >= epochs[position.stage]):
        problem = f"position stage {position.stage} epoch {position.epoch} is not in the " \
                  f"config's stages"
    elif state.epoch_index > sum(epochs):
        problem = f"epoch_index {state.epoch_index} exceeds the config's epochs"
    elif state.progress is not None and state.progress.micro != position.micro:
        problem = "its epoch progress and position disagree"
    elif not {"raw", "optimizer"} <= set(trees):
        problem = "it lacks the raw weights or the optimizer file"
    elif any(kind not in trees for kind in state.updates):
        problem = "it lacks an average it counts updates for"
    else:
        broken = [f"{kind}/{key}" for kind in ("raw", *state.updates)
                  for key, value in trees[kind].items()
                  if isinstance(value, np.ndarray) and value.dtype.kind == "f"
                  and not np.isfinite(value).all()]
        if broken:
            problem = f"non-finite weights in {', '.join(broken[:3])}"
    if problem:
        raise UserError(f"the checkpoint in {folder} is damaged ({problem}); resume from "
                        f"another copy or start again")


def restore(folder: str, cfg: Config, trees: bool = True,
            resuming: bool = True) -> tuple[RunState, dict]:
    """``(state, trees)`` of the resume checkpoint in ``folder``, checked against ``cfg``:
    the same config (:func:`check_same_config`), a position its stages could have written,
    the files it needs, finite weights. Without ``trees`` only the state is read and the
    config compared."""
    saved, tensors = load_last(folder, trees=trees)
    try:
        state = RunState.from_json(saved)
        sums = {} if state.progress is None else state.progress.sums
        missing = [part for part in ALWAYS if state.progress is not None and part not in sums]
        if missing:  # the loss parts every criterion sums (losses/parts.py)
            raise ValueError(f"'progress.sums' lacks {', '.join(missing)}")
    except ValueError as exc:
        raise UserError(f"the checkpoint in {folder} is damaged ({STATE}: {exc}); resume from "
                        f"another copy or start again") from None
    later = check_same_config(state, cfg, folder, resuming)
    if trees:
        check_position(state, tensors, cfg.stages, folder)
        if later:
            print(f"stages {', '.join(map(str, later))} differ from the checkpoint's config; "
                  f"they have not started and run as configured now", flush=True)
        state.config = to_plain(cfg)  # what later checkpoints are compared with
    return state, tensors


def finished(folder: str, cfg: Config, resuming: bool = True) -> Optional[RunState]:
    """The state of the checkpoint in ``folder`` if that run is complete (its final test
    done), else ``None``; a complete run's checkpoint is read and checked whole, as a
    resume would, so that a damaged one is reported rather than called complete. Not
    ``resuming`` (the same command run again) the settings read at the start must match."""
    state, _ = restore(folder, cfg, trees=False, resuming=resuming)
    if not state.tested or state.position.stage != len(cfg.stages):
        return None
    return restore(folder, cfg, resuming=resuming)[0]
