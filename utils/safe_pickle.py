"""Read Python pickles (CIFAR batches, ``.pdparams`` files) without running code from them.

A pickle can name any importable callable and have it called while loading, which is
how a malicious file runs code. The unpickler here resolves only what a CIFAR batch or
a Paddle state dict holds: NumPy array reconstruction, dtypes, NumPy scalars, ordered
dicts and the bytes helpers of protocol-2 pickles. Any other global is refused before it
is imported, so nothing from the file runs.
"""

import importlib
import pickle

import numpy as np

from utils.errors import UserError


def _numpy_core(name):
    try:  # NumPy 2 moved numpy.core to numpy._core; pickles name either
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _allowed_globals():
    import codecs
    import collections

    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("collections", "OrderedDict"): collections.OrderedDict,
               ("_codecs", "encode"): codecs.encode,
               # Python 2's name of bytes, in protocol-2 pickles of empty arrays
               ("__builtin__", "bytes"): bytes, ("builtins", "bytes"): bytes}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of NumPy arrays and plain containers."""

    allowed = _allowed_globals()

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is None:
            raise _Forbidden(f"{module}.{name}")
        return found


class _Forbidden(Exception):
    """A pickle asked for a global outside the allow-list."""


def _check_arrays(value, source):
    """Refuse object arrays: their items could only come from the pickle, never from a tensor."""
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise UserError(f"{source} holds an array of Python objects, which no tensor file or "
                        f"CIFAR batch has; refusing to use it")
    if isinstance(value, dict):
        for item in value.values():
            _check_arrays(item, source)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_arrays(item, source)


def safe_unpickle(handle, source, encoding="ASCII"):
    """Load one pickle from the binary file ``handle``; ``source`` names it in errors.

    A forbidden global, a truncated or malformed stream, or an array of Python objects
    is a :class:`UserError`; nothing the file names is imported or called.
    """
    try:
        value = RestrictedUnpickler(handle, encoding=encoding).load()
    except _Forbidden as exc:
        raise UserError(f"{source} asks to call {exc} while loading, which a tensor file or "
                        f"CIFAR batch never needs; refusing to load it (it may carry code: "
                        f"use files from a source you trust)") from None
    except Exception as exc:  # pickle raises many kinds for truncated or foreign bytes
        raise UserError(f"{source} is truncated or not a pickle file "
                        f"({exc.__class__.__name__}: {exc}); download or copy it again") from None
    _check_arrays(value, source)
    return value
