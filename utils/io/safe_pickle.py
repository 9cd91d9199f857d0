"""Read Python pickles (CIFAR batches, ``.pdparams`` files) without running code from them.

A pickle can name any importable callable and have it called while loading, which is
how a malicious file runs code. The unpickler here resolves only the names that a CIFAR
batch or a Paddle state dict uses, and none of them to the real NumPy callable: each
is a small builder that checks its arguments first. Arrays are made from bytes present
in the file (so a file cannot make the reader allocate more than about its own size),
with plain numeric dtypes only, and NumPy never sees a dtype state it did not write
itself (NumPy crashes on some, e.g. a datetime dtype with metadata ``None``). Any other
name is refused before it is imported, so nothing from the file runs.
"""

from __future__ import annotations

import codecs
import collections
import io
import pickle
from typing import Any, BinaryIO

import numpy as np

from utils.errors import UserError

# The dtypes of tensors and CIFAR batches: booleans, integers, floats.
DTYPE_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})
BYTE_ORDERS = ("<", ">", "|", "=")
MAX_NDIM = 8
# Nesting deeper than this is no state dict or CIFAR batch (and could exhaust the stack).
MAX_DEPTH = 32


class _Refused(Exception):
    """The pickle asked for something outside the allow-list (the text names it)."""


class _Malformed(Exception):
    """The pickle uses an allowed name in a way no tensor file does (the text says how)."""


class _DType:
    """A checked stand-in for ``numpy.dtype(code)``, turned into the real one after loading."""

    def __init__(self, code):
        self.code, self.order = code, "="

    def __setstate__(self, state):
        # NumPy writes (3, order, None, None, None, -1, -1, 0) for a plain dtype. Only the
        # byte order is taken; the rest never reaches NumPy, which builds the dtype anew.
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
        if order not in BYTE_ORDERS:
            raise _Malformed(f"a {self.code} dtype with the state {_short(state)}")
        self.order = order

    def real(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.order if self.order != "|" else "=")


class _Array:
    """A checked stand-in for an array made by ``_reconstruct`` and filled by its state."""

    array = None

    def __setstate__(self, state):
        if self.array is not None or not isinstance(state, tuple) or len(state) != 5:
            raise _Malformed(f"an array state {_short(state)}")
        version, shape, dtype, fortran, data = state
        if version != 1 or not isinstance(fortran, bool):
            raise _Malformed(f"an array state {_short(state)}")
        self.array = _build_array(data, dtype, shape, "F" if fortran else "C")


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dtype_of(spec):
    if not isinstance(spec, _DType):
        raise _Malformed(f"an array of dtype {_short(spec)}")
    return spec.real()


def _build_array(data, dtype_spec, shape, order="C"):
    """An array of ``shape`` from exactly the bytes ``data`` holds (copied, writable)."""
    dtype = _dtype_of(dtype_spec)
    if isinstance(data, pickle.PickleBuffer):
        data = data.raw()
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise _Malformed(f"array data of type {type(data).__name__}")
    if (not isinstance(shape, tuple) or len(shape) > MAX_NDIM
            or not all(type(n) is int and n >= 0 for n in shape)):
        raise _Malformed(f"an array shape {_short(shape)}")
    count = 1
    for n in shape:
        count *= n
    if count * dtype.itemsize != len(data):
        raise _Malformed(f"an array of shape {list(shape)} and dtype {dtype} declared over "
                         f"{len(data)} bytes of data")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy()


def _dtype(code, align=False, copy=True):
    if isinstance(code, bytes):  # Python 2 pickles (CIFAR) read with encoding="bytes"
        code = code.decode("ascii", "replace")
    if not isinstance(code, str) or code not in DTYPE_CODES:
        raise _Refused(f"numpy.dtype({_short(code)})")
    return _DType(code)


def _ndarray(*args):
    raise _Refused("numpy.ndarray(...) directly")


def _reconstruct(subtype, shape, code):
    if subtype is not _ndarray or shape != (0,) or code not in (b"b", "b"):
        raise _Malformed(f"_reconstruct{_short((shape, code))}")
    return _Array()


def _scalar(dtype_spec, data):
    return _build_array(data, dtype_spec, ())[()]


def _frombuffer(data, dtype_spec, shape, order):
    if order not in ("C", "F"):
        raise _Malformed(f"an array order {_short(order)}")
    return _build_array(data, dtype_spec, shape, order)


def _encode(text, encoding="utf-8"):
    # Protocol-2 pickles carry bytes as latin-1 text; other codecs (zlib, base64...) never.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode(..., {_short(encoding)})")
    return codecs.encode(text, "latin1")


def _bytes(*args):
    # Only bytes() (empty arrays); bytes(10**10) would allocate what the file never held.
    if args:
        raise _Refused(f"bytes{_short(args)}")
    return b""


def _allowed_globals():
    allowed = {("numpy", "ndarray"): _ndarray, ("numpy", "dtype"): _dtype,
               ("collections", "OrderedDict"): collections.OrderedDict,
               ("_codecs", "encode"): _encode,
               # Python 2's name of bytes, in protocol-2 pickles of empty arrays
               ("__builtin__", "bytes"): _bytes, ("builtins", "bytes"): _bytes}
    for core in ("numpy.core", "numpy._core"):  # NumPy 2 renamed numpy.core; pickles name either
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer  # protocol 5
    return allowed


class RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 - see the docstring
    """An unpickler that resolves only the checked builders above.

    It is Python's own pure-Python unpickler (``pickle._Unpickler``): the C one allocates
    the length a bytes or frame opcode declares before reading it, so a 40-byte file could
    make it reserve gigabytes; this one reads what is there and fails on the shortfall.
    """

    allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


PLAIN = (str, bytes, int, float, bool, type(None), np.ndarray, np.generic)


def _finish(value, depth=0):
    """The loaded value with stand-ins replaced by arrays; anything no tensor file or CIFAR
    batch holds is refused."""
    if depth > MAX_DEPTH:
        raise _Malformed(f"values nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, _Array):
        if value.array is None:
            raise _Malformed("an array without its data")
        return value.array
    if isinstance(value, _DType):
        raise _Malformed("a bare dtype")
    if isinstance(value, dict):
        items = [(_finish(k, depth + 1), _finish(v, depth + 1)) for k, v in value.items()]
        return type(value)(items) if type(value) in (dict, collections.OrderedDict) else dict(items)
    if isinstance(value, (list, tuple)):
        return type(value)(_finish(item, depth + 1) for item in value)
    if isinstance(value, PLAIN):
        return value
    raise _Malformed(f"a value of type {type(value).__name__}")


def safe_unpickle(handle: BinaryIO, source: str, encoding: str = "ASCII") -> Any:
    """Load one pickle from the binary file ``handle``; ``source`` names it in errors.

    A forbidden name, a truncated or malformed stream, or an array that is not a plain
    numeric tensor is a :class:`UserError`; nothing the file names is imported or called.
    """
    try:
        data = handle.read()  # bounded by the file: the stream cannot ask for more
        value = _finish(RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load())
    except _Refused as exc:
        raise UserError(f"{source} asks to call {exc} while loading, which a tensor file or "
                        f"CIFAR batch never needs; refusing to load it (it may carry code: "
                        f"use files from a source you trust)") from None
    except _Malformed as exc:
        raise UserError(f"{source} holds {exc}, which no tensor file or CIFAR batch has; "
                        f"refusing to use it") from None
    except Exception as exc:  # pickle raises many kinds for truncated or foreign bytes
        message = " ".join(str(exc).split())[:200]
        raise UserError(f"{source} is truncated or not a pickle file "
                        f"({exc.__class__.__name__}: {message}); download or copy it "
                        f"again") from None
    return value
