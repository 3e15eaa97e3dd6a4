"""The error type of rlctl's configuration, the collector that gathers every problem of one load, and the
rewriting of pydantic's validation errors into rlctl's one-line messages.

Each message starts with the full key path and the value given (:func:`rlctl.config.redact._kv`), says what
is wrong and how to fix it, and names the layer (preset / file:line / command line) that set the key.

Tests: ``pytest tests/unit/test_config.py tests/unit/test_config_fuzz.py``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import yaml
from pydantic import BaseModel

from rlctl.config.redact import _kv
from rlctl.config.schema import RunConfig, _submodel
from rlctl.config.yamlio import safe_load


class ConfigError(Exception):
    """Every problem found in a configuration; ``errors`` holds one line per problem.

    So that ``rlctl train`` / ``eval`` can report this machine's problems (:mod:`rlctl.preflight`) in the same
    message, a failed :func:`~rlctl.config.load_config` also carries:

    - ``cfg``: the config validated with every invalid value replaced by its default (None when none could be made);
    - ``unsure``: the key paths whose value in ``cfg`` is not the user's (replaced, or named by an error), or None
      when every error is about this machine only (a missing data file, model folder or package: ``check-config``
      only warns about those): then ``cfg`` is exactly the user's configuration.
    """

    def __init__(self, errors: list[str] | str, cfg: Any = None, unsure: Optional[set[str]] = None):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.cfg = cfg
        self.unsure = unsure
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)



def _short_label(label: str) -> str:
    """``preset gsm8k (/path/gsm8k.yaml:3)`` -> ``preset gsm8k``; other labels as they are."""
    return label.split(" (")[0]



class _Collector:
    def __init__(self, explicit: set[str], sources: dict[str, str], source_group: dict[str, int] | None = None):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.explicit = explicit
        self.sources = sources
        self.reported: set[str] = set()  # key paths already reported as errors
        self.given_as: dict[str, str] = {}  # canonical key -> the alias / vLLM name the user wrote
        # key path -> the layer that set it last, all command-line overrides counting as one layer
        self.source_group: dict[str, int] = source_group or {}
        # generator.backend as the user gave it when rlctl checks another one in its place (vllm: as sglang)
        self.backend_given: Optional[str] = None
        self.machine: list[str] = []  # errors only because of this machine (files, packages): warnings in check-config

    def src(self, path: str) -> str:
        """`` [file:line]`` (nothing for a command-line key); a key the user wrote under an alias / vLLM name
        (:mod:`rlctl.config.compat`) names it: `` [command line, as generator.tensor_parallel_size]``."""
        label = self.sources.get(path)
        where = f"{label}" if label and not label.startswith("override") else ""
        if path in self.given_as:
            where = f"{where or 'command line'}, as {self.given_as[path]}"
        return f" [{where}]" if where else ""

    def error(self, path: str, value: Any, msg: str, also: tuple[str, ...] = (), machine: bool = False) -> None:
        """An error on ``path``; ``also``: the other keys the rule involves, whose sources are named too
        when they differ (``[trainer.policy_mini_batch_size: preset gsm8k-cpu; trainer.train_batch_size:
        command line]``); ``machine``: an error only because of this machine (a missing file or package)."""
        self.reported.add(path)
        where = self.src(path)
        if also:
            def name(label: str) -> str:
                return "command line" if label.startswith("override") else _short_label(label)

            names = {k: name(self.sources[k]) for k in (path, *also) if self.sources.get(k)}
            # per key when the sources differ, or when another key of the rule was written under an alias
            if len(set(names.values())) > 1 or any(k in self.given_as for k in names if k != path):
                names = {k: f"{v}, as {self.given_as[k]}" if k in self.given_as else v for k, v in names.items()}
                where = " [" + "; ".join(f"{k}: {v}" for k, v in names.items()) + "]"
        self.errors.append(f"{_kv(path, value)}: {msg}{where}")
        if machine:
            self.machine.append(self.errors[-1])

    def note(self, path: str, msg: str) -> None:
        self.notes.append(f"{path}: {msg}")

    def warn(self, path: str, msg: str) -> None:
        self.warnings.append(f"{path}: {msg}")

    def no_effect(self, path: str, value: Any, why: str) -> None:
        self.notes.append(f"{_kv(path, value)} has no effect: {why}")



# --------------------------------------------------------------------------------------------------
# Pydantic error rewriting
# --------------------------------------------------------------------------------------------------

_TYPE_WORDS = {
    "string_type": "expected a string (quote it in YAML)",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "list_type": "expected a list, e.g. [a, b]",
    "dict_type": "expected a mapping of keys",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "finite_number": "expected a finite number",
    "int_from_float": "expected an integer",
    "none_required": "expected null",
}


def _loc_to_path(loc: tuple) -> str:
    model: Optional[type[BaseModel]] = RunConfig
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            continue
        if model is not None and item in model.model_fields:
            parts.append(item)
            model = _submodel(model.model_fields[item].annotation)
        elif model is not None and not model.model_fields:
            break
        elif model is not None:
            parts.append(str(item))  # unknown key (should have been caught earlier)
            model = None
        # else: union member tags such as 'str' / 'list[str]' / 'literal[...]'
    return ".".join(parts)



def _is_quoted_scalar(value: Any, typ: str) -> bool:
    """A string that would have been the expected number / boolean without its quotes (``"5"``)."""
    if not isinstance(value, str) or typ not in ("int_type", "float_type", "bool_type", "int_from_float"):
        return False
    if len(value) > 64:
        return False
    try:
        loaded = safe_load(value)
    except (yaml.YAMLError, ValueError, RecursionError, OverflowError):
        return False
    if typ == "bool_type":
        return isinstance(loaded, bool)
    if isinstance(loaded, bool) or not isinstance(loaded, (int, float)) or loaded != loaded or loaded in (float("inf"), float("-inf")):
        return False
    return isinstance(loaded, int) if typ in ("int_type", "int_from_float") else True


def _rewrite_error(err: dict) -> tuple[str, Any, str]:
    path = _loc_to_path(err["loc"]) or "(top level)"
    typ = err["type"]
    ctx = err.get("ctx") or {}
    if typ == "literal_error":
        msg = f"must be one of {ctx.get('expected', '')}"
    elif typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        key = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}[typ]
        msg = f"must be {op} {ctx.get(key)}"
    elif typ == "value_error":
        msg = str(ctx.get("error", err["msg"]))
    elif typ == "extra_forbidden":
        msg = "unknown key; remove it"
    elif typ in _TYPE_WORDS:
        msg = _TYPE_WORDS[typ]
        if _is_quoted_scalar(err.get("input"), typ):
            msg += f", got the string {json.dumps(err['input'])} (quoted in YAML?); remove the quotes"
    else:
        msg = err["msg"]
    return path, err.get("input"), msg
