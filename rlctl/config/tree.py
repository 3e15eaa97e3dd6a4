"""Helpers on nested dicts addressed by dotted key paths (``trainer.policy.optimizer_config.lr``): get,
test, set, remove, nest and deep-merge. Used on the raw (not yet validated) config layers.

Tests: through ``pytest tests/unit/test_config.py``.
"""

from __future__ import annotations

import copy
from typing import Any

def _get(d: Any, path: str, default: Any = None) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _has(d: Any, path: str) -> bool:
    sentinel = object()
    return _get(d, path, sentinel) is not sentinel


def _set(d: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        nxt = d.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            d[part] = nxt
        d = nxt
    d[parts[-1]] = value


def _pop(d: Any, path: str) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(d, dict):
            return
        d = d.get(part)
    if isinstance(d, dict):
        d.pop(parts[-1], None)



def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out



def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
