"""Checkpoints in ``train.output_dir``: ``<tag>.pdparams`` (+ ``.pdopt``) and ``<tag>.json``."""

import json
import os

import paddle


def _replace_atomically(path, write):
    """Write through a temporary file in the same folder, then rename over ``path``.

    A run interrupted mid-save leaves the previous file intact.
    """
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def weights_path(output_dir, tag):
    """Path of the model weights saved under ``tag`` (``best`` or ``last``)."""
    return os.path.join(output_dir, f"{tag}.pdparams")


def save_checkpoint(output_dir, tag, model, meta, optimizer=None):
    """Save model (and optimizer) state and a JSON ``meta`` record under ``tag``."""
    os.makedirs(output_dir, exist_ok=True)
    _replace_atomically(weights_path(output_dir, tag),
                        lambda tmp: paddle.save(model.state_dict(), tmp))
    if optimizer is not None:
        _replace_atomically(os.path.join(output_dir, f"{tag}.pdopt"),
                            lambda tmp: paddle.save(optimizer.state_dict(), tmp))
    write_json(os.path.join(output_dir, f"{tag}.json"), meta)


def write_json(path, record):
    """Write ``record`` as indented JSON, atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
    _replace_atomically(path, write)


def read_meta(output_dir, tag):
    """The JSON record saved with ``tag``, or ``None`` when there is none."""
    path = os.path.join(output_dir, f"{tag}.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
