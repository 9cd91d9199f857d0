"""Checkpoints in ``train.output_dir``, all safetensors + JSON (no pickles).

- ``best.safetensors`` (its record in the file's metadata) and ``best.json`` (the same
  record, for people): the weights with the best validation top-1.
- ``last/``: everything a resume needs: ``raw`` (the trained weights), ``optimizer``,
  ``ema`` and ``swa`` (when enabled) ``.safetensors`` files and ``state.json`` (the
  :class:`training.state.RunState` and the list of files).

Every file is written through :func:`utils.io.files.write_atomically`. ``last/`` is
built as ``last.partial/`` and swapped in by two renames, so a kill at any moment
leaves a complete checkpoint as ``last/`` or, between the renames, ``last.old/``.
A write that fails (a full disk) is one :class:`UserError` and the previous
checkpoint stays.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Union

from utils.errors import UserError
from utils.io.files import fsync_dir, read_json, write_json
from utils.io.tensor_io import SAFETENSORS, load_tensors, save_tensors

LAST, PARTIAL, OLD = "last", "last.partial", "last.old"
STATE = "state.json"
TREES = ("raw", "optimizer", "ema", "swa", "scaler")


def weights_path(output_dir: str, tag: str) -> str:
    """Path of the best weights (``tag='best'``) or of the last checkpoint's weights of kind
    ``tag`` (``raw``, ``ema``, ``swa``)."""
    if tag == "best":
        return os.path.join(output_dir, "best" + SAFETENSORS)
    return os.path.join(output_dir, LAST, tag + SAFETENSORS)


def _saving(output_dir, write):
    """Run ``write``; an OS error (disk full, no permission) becomes one clear line."""
    try:
        write()
    except OSError as exc:
        kept = ("the previous checkpoint there is kept: free space or fix the folder, then "
                "continue with --resume") if find_last(output_dir) else (
                "no checkpoint was saved there yet: free space or fix the folder, then start "
                "again")
        raise UserError(f"cannot save the checkpoint in {output_dir} ({exc.strerror or exc}"
                        f"{': ' + str(exc.filename) if exc.filename else ''}); {kept}") from None


def save_best(output_dir: str, state_dict: dict, record: dict, class_names: list[str]) -> None:
    """Save the best weights with their record and class names."""
    def write() -> None:
        os.makedirs(output_dir, exist_ok=True)
        save_tensors(weights_path(output_dir, "best"), state_dict,
                     {"record": record, "class_names": list(class_names)})
        write_best_json(output_dir, record, class_names)
    _saving(output_dir, write)


def write_best_json(output_dir: str, record: dict, class_names: list[str]) -> None:
    """``best.json``: the best record and the class names, for people and other programs."""
    write_json(os.path.join(output_dir, "best.json"), dict(record, class_names=list(class_names)))


def save_last(output_dir: str, trees: dict, state: dict, class_names: list[str]) -> None:
    """Save the resume checkpoint: ``trees`` maps names (``raw``, ``optimizer``, ...) to
    (nested) state dicts, ``state`` is the run state's JSON form; the weights files carry
    ``class_names``."""
    partial = os.path.join(output_dir, PARTIAL)
    last, old = os.path.join(output_dir, LAST), os.path.join(output_dir, OLD)

    def write() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for name, tree in trees.items():
            save_tensors(os.path.join(partial, name + SAFETENSORS), tree,
                         None if name in ("optimizer", "scaler") else
                         {"class_names": list(class_names)})
        write_json(os.path.join(partial, STATE), dict(state, files=sorted(trees)))
        if os.path.isdir(last):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(last, old)
        os.replace(partial, last)
        fsync_dir(output_dir)
        shutil.rmtree(old, ignore_errors=True)

    try:
        _saving(output_dir, write)
    except UserError:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _complete(folder):
    state = read_json(os.path.join(folder, STATE)) if os.path.isdir(folder) else None
    files = state.get("files") if isinstance(state, dict) else None
    return isinstance(files, list) and all(
        isinstance(name, str) and os.path.isfile(os.path.join(folder, name + SAFETENSORS))
        for name in files)


def find_last(output_dir: str) -> Optional[str]:
    """The folder of the newest complete resume checkpoint, or ``None``."""
    for name in (LAST, OLD):
        folder = os.path.join(output_dir, name)
        if _complete(folder):
            return folder
    return None


def load_last(folder: str, trees: bool = True) -> tuple[dict, dict]:
    """``(state, trees)`` of a resume checkpoint folder; trees by name, tensors as NumPy arrays
    (none with ``trees=False``).

    ``state.json`` is checked key by key: a damaged or edited one is one clear error.
    """
    state = read_json(os.path.join(folder, STATE))
    try:
        check_state(state)
    except ValueError as exc:
        raise UserError(f"the checkpoint in {folder} is damaged ({STATE}: {exc}); resume from "
                        f"another copy or start again") from None
    if not trees:
        return state, {}
    return state, {name: load_tensors(os.path.join(folder, name + SAFETENSORS))[0]
                   for name in state["files"]}


def _count(value, key):
    if type(value) is not int or value < 0:
        raise ValueError(f"'{key}' must be a count (an integer >= 0), got {value!r}"[:160])


def _number(value, key):
    if type(value) not in (int, float) or value != value or value in (float("inf"), -float("inf")):
        raise ValueError(f"'{key}' must be a finite number, got {value!r}"[:160])


def _mapping(value, key, keys=()):
    if not isinstance(value, dict):
        raise ValueError(f"'{key}' must be a mapping, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"'{key}' lacks {', '.join(missing)}")
    return value


def check_state(state: dict) -> None:
    """Raise :class:`ValueError` naming the first key of a resume state that is missing or
    of the wrong kind (counts are integers >= 0, numbers finite)."""
    _mapping(state, "the state", ("position", "epoch_index", "global_step", "skipped_steps",
                                  "best", "progress", "updates", "config", "files"))
    position = _mapping(state["position"], "position", ("stage", "epoch", "micro"))
    for key in ("stage", "epoch", "micro"):
        _count(position[key], f"position.{key}")
    for key, value in (("position.evaluating", position.get("evaluating", False)),
                       ("tested", state.get("tested", False))):
        if not isinstance(value, bool):
            raise ValueError(f"'{key}' must be true or false")
    for key in ("epoch_index", "global_step", "skipped_steps"):
        _count(state[key], key)
    if "records" in state:
        _count(state["records"], "records")
    for kind, updates in _mapping(state["updates"], "updates").items():
        _count(updates, f"updates.{kind}")
    if state["best"] is not None:
        best = _mapping(state["best"], "best", ("val_top1", "val_num_samples", "kind", "stage",
                                                "epoch"))
        _number(best["val_top1"], "best.val_top1")
        for key in ("val_num_samples", "stage", "epoch"):
            _count(best[key], f"best.{key}")
    if state["progress"] is not None:
        progress = _mapping(state["progress"], "progress", ("micro", "seen", "sums", "elapsed",
                                                            "excluded"))
        for key in ("micro", "seen", "excluded", "steps", "overflow_steps"):
            if key in progress:
                _count(progress[key], f"progress.{key}")
        # Which loss parts the sums must hold is the run state's to say (losses/parts.py).
        for key, value in _mapping(progress["sums"], "progress.sums").items():
            _number(value, f"progress.sums.{key}")
        for key in ("elapsed", "grad_norm_sum"):
            if key in progress:
                _number(progress[key], f"progress.{key}")
        if progress.get("grad_norm_max") is not None:
            _number(progress["grad_norm_max"], "progress.grad_norm_max")
    if not isinstance(state.get("data"), (str, type(None))):
        raise ValueError("'data' must be the data's fingerprint or null")
    if state.get("teacher") is not None:
        teacher = _mapping(state["teacher"], "teacher", ("weights", "sha256"))
        if not all(isinstance(teacher[key], str) for key in ("weights", "sha256")):
            raise ValueError("'teacher' must name a weights file and its sha256")
    _mapping(state["config"], "config")
    files = state["files"]
    if not isinstance(files, list) or not all(isinstance(f, str) and f in TREES for f in files):
        raise ValueError(f"'files' must list checkpoint files among {', '.join(TREES)}")


def resume_folder(resume: Union[bool, str, None], output_dir: str) -> str:
    """The checkpoint folder that ``--resume [PATH]`` names (an output dir or a ``last/`` folder)."""
    where = resume if isinstance(resume, str) else output_dir
    folder = find_last(where)
    if folder is None and _complete(where):
        folder = where
    if folder is None:
        raise UserError(f"no complete checkpoint to resume in {where}; start without --resume")
    return folder
