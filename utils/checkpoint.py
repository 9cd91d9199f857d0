"""Checkpoints in ``train.output_dir``.

- ``best.pdparams`` / ``best.json``: the weights with the best validation top-1 and their record.
- ``last/``: everything a resume needs: ``model.pdparams``, ``optimizer.pdopt``, ``ema.pdparams``
  and ``swa.pdparams`` (when enabled) and ``state.json`` (position, best record, averages' counts).

``last/`` is written as ``last.partial/`` and swapped in by two renames, so an interrupted
save leaves the previous checkpoint loadable (as ``last/`` or, between the renames,
``last.old/``).
"""

import json
import os
import shutil

import paddle

LAST, PARTIAL, OLD = "last", "last.partial", "last.old"


def _replace_atomically(path, write):
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def weights_path(output_dir, tag):
    """Path of the best weights (``tag='best'``) or of the last checkpoint's ``tag`` weights
    (``model``, ``ema``, ``swa``)."""
    if tag == "best":
        return os.path.join(output_dir, "best.pdparams")
    return os.path.join(output_dir, LAST, f"{tag}.pdparams")


def write_json(path, record):
    """Write ``record`` as indented JSON, atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
    _replace_atomically(path, write)


def read_json(path):
    """The JSON record at ``path``, or ``None`` when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_best(output_dir, state_dict, record):
    """Save the best weights and their record."""
    os.makedirs(output_dir, exist_ok=True)
    _replace_atomically(weights_path(output_dir, "best"), lambda tmp: paddle.save(state_dict, tmp))
    write_json(os.path.join(output_dir, "best.json"), record)


def save_last(output_dir, tensors, state):
    """Save the resume checkpoint: ``tensors`` maps file names to state dicts, ``state`` is JSON."""
    partial = os.path.join(output_dir, PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for name, content in tensors.items():
        paddle.save(content, os.path.join(partial, name))
    write_json(os.path.join(partial, "state.json"), state)
    last, old = os.path.join(output_dir, LAST), os.path.join(output_dir, OLD)
    if os.path.isdir(last):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(last, old)
    os.replace(partial, last)
    shutil.rmtree(old, ignore_errors=True)


def find_last(output_dir):
    """The folder of the newest complete resume checkpoint, or ``None``."""
    for name in (LAST, OLD):
        folder = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(folder, "state.json")):
            return folder
    return None


def load_last(folder):
    """``(state, tensors)`` of a resume checkpoint folder; tensors by file name."""
    state = read_json(os.path.join(folder, "state.json"))
    tensors = {name: paddle.load(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
               if name.endswith((".pdparams", ".pdopt"))}
    return state, tensors
