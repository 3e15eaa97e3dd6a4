"""rlctl's YAML reader: ``yaml.SafeLoader`` (no Python object tags) that also reads ``3e-6`` as a float,
refuses duplicate keys, and remembers the line of each mapping key (:class:`_LineDict`) so that errors can
say ``file:line``.

Tests: ``pytest tests/unit/test_config.py -k "yaml or duplicate or line"``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python object tags) that also reads ``3e-6`` as a float (YAML 1.2);
    YAML 1.1 only knows ``3.0e-6`` and would hand the learning rate over as a string."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _LineDict(dict):
    """A YAML mapping that remembers the 1-based line of each of its keys (``key_lines``), so that
    errors about a key of a config file can say ``file:line``."""

    key_lines: dict


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


def _construct_mapping_with_lines(loader: "_SafeLoader", node: yaml.MappingNode, deep: bool = False) -> _LineDict:
    lines: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" merges may repeat keys on purpose
            continue
        if key_node.tag == "tag:yaml.org,2002:value":  # a bare "=" key is the string "=" (as SafeLoader does)
            key_node.tag = "tag:yaml.org,2002:str"
        key = loader.construct_object(key_node, deep=True)
        try:
            first = lines.get(key)
        except TypeError:  # unhashable key: SafeConstructor reports it
            continue
        if first is not None:
            raise _DuplicateKeyError(None, None, f"duplicate key {key!r} (first on line {first}); give each key once",
                                     key_node.start_mark)
        lines[key] = key_node.start_mark.line + 1
    out = _LineDict(yaml.SafeLoader.construct_mapping(loader, node, deep=deep))
    out.key_lines = lines
    return out


def _construct_yaml_map(loader: "_SafeLoader", node: yaml.MappingNode):
    data = _LineDict()
    data.key_lines = {}
    yield data
    value = _construct_mapping_with_lines(loader, node)
    data.update(value)
    data.key_lines = value.key_lines


_SafeLoader.add_constructor("tag:yaml.org,2002:map", _construct_yaml_map)
yaml.SafeDumper.add_representer(_LineDict, yaml.representer.SafeRepresenter.represent_dict)  # dumps as a mapping


def safe_load(text: str) -> Any:
    """Parse YAML with :class:`_SafeLoader` (safe: Python object tags are refused)."""
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
