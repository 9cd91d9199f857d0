"""YAML as configs are read: YAML 1.2's scalars, no repeated keys, bounded size and depth.

A config file is UTF-8 text under ``MAX_CONFIG_BYTES`` whose aliases expand to fewer than
``MAX_CONFIG_VALUES`` values; anything else is one :class:`UserError`.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from utils.errors import UserError
from utils.io.files import read_text

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Far above any recipe, far below what hangs a machine (YAML aliases can multiply a file).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 32


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's scalars: ``1e-4`` is a float (YAML 1.1 needs ``1.0e-4``)
    and only true/false are booleans (YAML 1.1 also reads on/off/yes/no, so
    ``amp: off`` would not be the string ``off``)."""


BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in value if tag != BOOL_TAG]
    for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _unique_mapping(loader, node, deep=False):
    """A mapping whose keys are all different: YAML lets a repeated key silently replace the
    first (a second ``train:`` section would drop the first one's settings)."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            repeated = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: the mapping's own check reports it
            continue
        if repeated:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {short(key)} appears twice in one mapping (line {line}); "
                f"the second would silently replace the first", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_size(value, source):
    """Refuse YAML whose aliases expand beyond any config (a "billion laughs" file makes a
    small text into an exponentially large, or endless, tree)."""
    budget, stack = MAX_CONFIG_VALUES, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > MAX_CONFIG_DEPTH:
            raise UserError(f"{source} expands to more than {MAX_CONFIG_VALUES} values or "
                            f"{MAX_CONFIG_DEPTH} levels (YAML aliases referring to each other?)")
        if isinstance(node, dict):
            stack.extend((item, depth + 1) for pair in node.items() for item in pair)
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)


def _check_depth(text, source):
    """Refuse YAML nested deeper than ``MAX_CONFIG_DEPTH`` from its event stream, before it
    is composed (composing recurses once per level: thousands of levels would end in a
    RecursionError)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise UserError(f"{source} nests more than {MAX_CONFIG_DEPTH} levels deep; no "
                                f"config does")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _unshared(node):
    """``node`` with every mapping and list its own: YAML aliases (``*opt`` of ``&opt``) load
    as one shared object, so an override of one place would change the other."""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(value) for value in node]
    return node


def load_yaml(text: str, source: str) -> Any:
    """The value of YAML ``text`` (``source`` names it in errors), every part its own."""
    try:
        _check_depth(text, source)
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise UserError(f"{source} is not valid YAML: {' '.join(str(exc).split())}") from None
    _check_size(value, source)
    return _unshared(value)


def read_yaml(path: str) -> dict:
    """Read a YAML mapping from ``path`` (relative paths also tried from the project root)."""
    if not os.path.exists(path) and os.path.isfile(os.path.join(PROJECT_ROOT, path)):
        path = os.path.join(PROJECT_ROOT, path)
    text = read_text(path, "config file", MAX_CONFIG_BYTES)
    raw = load_yaml(text, f"config file {path}")
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return raw
