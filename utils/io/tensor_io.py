"""Tensor files: safetensors for everything this project writes, ``.pdparams`` read safely.

Half-precision tensors (AMP O2 weights) are written as float32: NumPy has no bfloat16.

A safetensors file is a JSON header plus raw tensor bytes: it cannot carry code.
``.pdparams`` files (PPIM's downloads, weights from elsewhere) are pickles and go
through :mod:`utils.io.safe_pickle`. Nested states (an optimizer's) are stored flat, with
``/``-joined keys for the tensors and the remaining plain values as JSON metadata.

Each file written here carries the SHA-256 of its tensors and metadata in its header,
checked when it is read: a copy whose bytes changed (bit rot, a half-copied file) is
refused instead of trained on.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from utils.errors import UserError
from utils.io.files import json_text, path_problem, write_atomically

if TYPE_CHECKING:
    import paddle

SAFETENSORS = ".safetensors"
# Entries paddle.save adds next to the tensors: a name table, not weights.
PADDLE_META_SUFFIX = "@@"


def _as_array(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    if hasattr(value, "numpy"):  # a paddle.Tensor, on whatever device
        if value.dtype in _half_dtypes():  # AMP O2 weights; NumPy has no bfloat16
            value = value.astype("float32")
        return value.numpy()
    return None


def _half_dtypes():
    import paddle

    return (paddle.float16, paddle.bfloat16)


def pack(tree: dict, prefix: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """Split a nested dict into ``(flat tensors by '/'-joined key, the rest as a plain dict)``."""
    tensors, rest = {}, {}
    for key, value in tree.items():
        array = _as_array(value)
        if array is not None:
            tensors[prefix + key] = np.ascontiguousarray(array)
        elif isinstance(value, dict):
            sub_tensors, sub_rest = pack(value, f"{prefix}{key}/")
            tensors.update(sub_tensors)
            rest[key] = sub_rest
        else:
            rest[key] = value
    return tensors, rest


def unpack(tensors: dict[str, np.ndarray], rest: dict) -> dict:
    """Invert :func:`pack`: the nested dict with NumPy arrays at the tensor leaves."""
    tree = json.loads(json.dumps(rest))
    for flat_key, array in tensors.items():
        *parents, leaf = flat_key.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = array
    return tree


def as_paddle(tree: Any) -> Any:
    """The nested dict with its NumPy arrays turned into Paddle tensors on the current device."""
    import paddle

    return {key: (paddle.to_tensor(value) if isinstance(value, np.ndarray)
                  else as_paddle(value) if isinstance(value, dict) else value)
            for key, value in tree.items()}


def load_state(layer: paddle.nn.Layer, state: dict) -> None:
    """``layer.set_state_dict(state)`` with every value cast to its tensor's dtype, so that
    float32 files load into half-precision (AMP O2) weights and back."""
    own = layer.state_dict()
    layer.set_state_dict({key: (as_paddle({key: value})[key].astype(own[key].dtype)
                                if key in own else value) for key, value in state.items()})


def _digest(tensors, header):
    """SHA-256 of the tensors (names, dtypes, shapes, bytes) and the JSON header parts."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}\0{array.dtype.str}\0{array.shape}\0".encode("utf-8"))
        digest.update(array.reshape(-1).view(np.uint8) if array.size else b"")
    for key in ("rest", "metadata"):
        digest.update(f"{key}\0{header.get(key, '')}\0".encode("utf-8"))
    return digest.hexdigest()


def save_tensors(path: str, tree: dict, metadata: Optional[dict] = None) -> None:
    """Write a (nested) state as safetensors, durably; ``metadata`` is a JSON-ready dict."""
    from safetensors.numpy import save

    tensors, rest = pack(tree)
    header = {"rest": json_text(rest), "metadata": json_text(metadata or {})}
    header["sha256"] = _digest(tensors, header)
    write_atomically(path, save(tensors, metadata=header))


def _load_safetensors(path):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # SafetensorError, OSError: truncated or foreign bytes
        message = " ".join(str(exc).split())[:200]
        raise UserError(f"{path} is truncated or not a safetensors file ({message}); "
                        f"use another copy or the previous checkpoint") from None
    if "sha256" in header and header["sha256"] != _digest(tensors, header):
        raise UserError(f"{path} is damaged: its bytes no longer match the checksum written "
                        f"with them (bit rot or an incomplete copy); use another copy or the "
                        f"previous checkpoint")
    try:
        rest, metadata = json.loads(header.get("rest", "{}")), json.loads(
            header.get("metadata", "{}"))
        if not isinstance(rest, dict) or not isinstance(metadata, dict):
            raise ValueError("not a mapping")
        return unpack(tensors, rest), metadata
    except (ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} has damaged metadata ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:120]}); use another copy") from None


def _load_pdparams(path):
    from utils.io.safe_pickle import safe_unpickle  # only .pdparams files need an unpickler

    with open(path, "rb") as handle:
        state = safe_unpickle(handle, f"weights file {path}")
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state dict "
                        f"(found {type(state).__name__})")
    tensors = {}
    for key, value in state.items():
        if str(key).endswith(PADDLE_META_SUFFIX):
            continue
        if not isinstance(value, np.ndarray):
            raise UserError(f"weights file {path} does not hold a state dict of tensors "
                            f"({key!r} is a {type(value).__name__})")
        tensors[key] = value
    return tensors, {}


def metadata_of(path: str) -> dict:
    """The metadata of a weights file (``{}`` if none or not ``.safetensors``), read without
    its tensors."""
    if not path.endswith(SAFETENSORS) or path_problem(path):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as handle:
            metadata = json.loads((handle.metadata() or {}).get("metadata", "{}"))
    except Exception:  # noqa: BLE001 - a damaged header: loading the tensors says so
        return {}
    return metadata if isinstance(metadata, dict) else {}


def record_of(path: str) -> dict:
    """The record a best-weights file carries in its header (``{}`` if none)."""
    record = metadata_of(path).get("record")
    return record if isinstance(record, dict) else {}


def class_names_of(path: str) -> Optional[list[str]]:
    """The class names a weights file of this project carries, or ``None`` (another file, or
    names that are not a list of distinct strings)."""
    names = metadata_of(path).get("class_names")
    if (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)):
        return names
    return None


def load_tensors(path: str) -> tuple[dict, dict]:
    """``(state, metadata)`` of a ``.safetensors`` or ``.pdparams`` file; tensors as NumPy arrays."""
    problem = path_problem(path)
    if problem:
        raise UserError(f"weights file {path} {'not found' if problem == 'does not exist' else problem}")
    if path.endswith(SAFETENSORS):
        return _load_safetensors(path)
    return _load_pdparams(path)
