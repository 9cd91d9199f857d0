"""Checkpoints in ``train.output_dir``, all safetensors + JSON (no pickles).

- ``best.safetensors`` (its record in the file's metadata) and ``best.json`` (the same
  record, for people): the weights with the best validation top-1.
- ``last/``: everything a resume needs: ``model``, ``optimizer``, ``ema`` and ``swa``
  (when enabled) ``.safetensors`` files and ``state.json`` (position, best record,
  averages' counts, the list of files).

Every file is written through :func:`utils.files.write_atomically`. ``last/`` is
built as ``last.partial/`` and swapped in by two renames, so a kill at any moment
leaves a complete checkpoint as ``last/`` or, between the renames, ``last.old/``.
A write that fails (a full disk) is one :class:`UserError` and the previous
checkpoint stays.
"""

import os
import shutil

from utils.errors import UserError
from utils.files import fsync_dir, read_json, write_json
from utils.tensor_io import SAFETENSORS, load_tensors, save_tensors

LAST, PARTIAL, OLD = "last", "last.partial", "last.old"
STATE = "state.json"


def weights_path(output_dir, tag):
    """Path of the best weights (``tag='best'``) or of the last checkpoint's ``tag`` weights
    (``model``, ``ema``, ``swa``)."""
    if tag == "best":
        return os.path.join(output_dir, "best" + SAFETENSORS)
    return os.path.join(output_dir, LAST, tag + SAFETENSORS)


def _saving(output_dir, write):
    """Run ``write``; an OS error (disk full, no permission) becomes one clear line."""
    try:
        write()
    except OSError as exc:
        raise UserError(f"cannot save the checkpoint in {output_dir} ({exc.strerror or exc}"
                        f"{': ' + exc.filename if exc.filename else ''}); the previous checkpoint "
                        f"there is kept: free space or fix the folder, then continue with "
                        f"--resume") from None


def save_best(output_dir, state_dict, record):
    """Save the best weights with their record."""
    def write():
        os.makedirs(output_dir, exist_ok=True)
        save_tensors(weights_path(output_dir, "best"), state_dict, {"record": record})
        write_json(os.path.join(output_dir, "best.json"), record)
    _saving(output_dir, write)


def save_last(output_dir, trees, state):
    """Save the resume checkpoint: ``trees`` maps names (``model``, ``optimizer``, ...) to
    (nested) state dicts, ``state`` is the trainer's JSON state."""
    partial = os.path.join(output_dir, PARTIAL)
    last, old = os.path.join(output_dir, LAST), os.path.join(output_dir, OLD)

    def write():
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for name, tree in trees.items():
            save_tensors(os.path.join(partial, name + SAFETENSORS), tree)
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
    return state is not None and all(
        os.path.isfile(os.path.join(folder, name + SAFETENSORS)) for name in state.get("files", ()))


def find_last(output_dir):
    """The folder of the newest complete resume checkpoint, or ``None``."""
    for name in (LAST, OLD):
        folder = os.path.join(output_dir, name)
        if _complete(folder):
            return folder
    return None


def load_last(folder):
    """``(state, trees)`` of a resume checkpoint folder; trees by name, tensors as NumPy arrays."""
    state = read_json(os.path.join(folder, STATE))
    trees = {name: load_tensors(os.path.join(folder, name + SAFETENSORS))[0]
             for name in state["files"]}
    return state, trees


def resume_folder(resume, output_dir):
    """The checkpoint folder that ``--resume [PATH]`` names (an output dir or a ``last/`` folder)."""
    where = resume if isinstance(resume, str) else output_dir
    folder = find_last(where)
    if folder is None and _complete(where):
        folder = where
    if folder is None:
        raise UserError(f"no complete checkpoint to resume in {where}; start without --resume")
    return folder


def first_difference(saved, current, ignore=(), path=""):
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
