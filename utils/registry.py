"""Registries of the recipe's extensible parts (optimizers, LR schedules, data formats): a
package whose modules each declare their entries, found by listing the package, so that
adding one is adding a module."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def entries_of(package: str, attribute: str) -> dict[str, Any]:
    """The entries the modules of ``package`` declare as ``attribute`` (one entry, or a tuple
    of them), keyed by their ``name``, in the order of the modules' names. Two entries of
    one name are a programming error, raised at import."""
    found: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__),
                       key=lambda info: info.name):
        declared = getattr(importlib.import_module(f"{package}.{info.name}"), attribute)
        for entry in declared if isinstance(declared, tuple) else (declared,):
            if entry.name in found:
                raise ValueError(f"{package}: two entries named {entry.name!r}")
            found[entry.name] = entry
    return found
