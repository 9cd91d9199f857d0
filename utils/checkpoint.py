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
from typing import Any, Optional, Union

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

    The files ``state.json`` lists are checked before they are opened: a damaged or edited
    list is one clear error (the run state itself: :func:`training.state.check_json`).
    """
    state = read_json(os.path.join(folder, STATE))
    try:
        check_files(state)
    except ValueError as exc:
        raise UserError(f"the checkpoint in {folder} is damaged ({STATE}: {exc}); resume from "
                        f"another copy or start again") from None
    if not trees:
        return state, {}
    return state, {name: load_tensors(os.path.join(folder, name + SAFETENSORS))[0]
                   for name in state["files"]}


def check_files(state: Any) -> None:
    """Raise :class:`ValueError` unless ``state`` (a ``state.json``) is a mapping whose
    ``files`` lists checkpoint files by their names; the rest of it is the run state's to
    check (:func:`training.state.check_json`)."""
    if not isinstance(state, dict):
        raise ValueError(f"'the state' must be a mapping, got {type(state).__name__}")
    files = state.get("files")
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
