"""Loading a run configuration: presets and ``--config`` files (composed through their ``defaults:``),
``key=value`` overrides, the precedence between them, unknown-key checks with suggestions, the source
(layer, file:line) of every key, and validation into a :class:`~rlctl.config.schema.RunConfig`.

Precedence (lowest first; written once, here and in README "Configuration")::

    schema defaults  <  --preset NAME  <  --config FILE  <  key=value overrides and --backend B

Tests: ``pytest tests/unit/test_config.py tests/unit/test_presets.py tests/unit/test_seed.py``.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ValidationError

from rlctl.config.compat import COMPAT_TABLES, _normalize
from rlctl.config.errors import ConfigError, _Collector, _rewrite_error, _short_label
from rlctl.config.paths import expand_path
from rlctl.config.redact import REDACTED, _fmt, _is_secret_path, _kv, _redact_override, _redact_text
from rlctl.config.rules import _rules
from rlctl.config.schema import LEAF_DEFAULTS, RunConfig, _field_info, _submodel, _unwrap
from rlctl.config.tree import _get, _has, _merge, _nest, _pop, _set
from rlctl.config.yamlio import _DuplicateKeyError, _LineDict, safe_load

_PRESET_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


def presets_dir() -> Path:
    """``$RLCTL_PRESETS_DIR``; else the repository's top-level ``presets/`` when running from a checkout; else the
    installed package ``rlctl.presets`` (the wheel ships ``presets/*.yaml`` there through a package-dir mapping)."""
    env = os.environ.get("RLCTL_PRESETS_DIR")
    if env:
        return Path(expand_path(env))
    checkout = Path(__file__).resolve().parents[2] / "presets"
    if (checkout / "gsm8k.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parent.parent / "presets"  # site-packages/rlctl/presets


def list_presets() -> list[tuple[str, str]]:
    """``[(name, description)]`` for every ``presets/*.yaml`` (description: first ``# description:`` line)."""
    out = []
    folder = presets_dir()
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("*.yaml")):
        desc = ""
        try:
            for line in p.read_text(encoding="utf-8").splitlines():
                m = re.match(r"\s*#\s*description:\s*(.*)", line)
                if m:
                    desc = m.group(1).strip()
                    break
        except OSError:
            desc = "(unreadable)"
        out.append((p.stem, desc))
    return out


def _preset_path(name: Any, where: str) -> Path:
    if not isinstance(name, str) or not _PRESET_NAME_RE.fullmatch(name) or name.strip(".") == "":
        raise ConfigError(f"{where}: preset name {name!r} is invalid; use letters, digits, '_', '.', '-' (see `rlctl presets`)")
    folder = presets_dir().resolve()
    stem = name[:-5] if name.endswith(".yaml") else name
    path = (folder / f"{stem}.yaml").resolve()
    if path.parent != folder:
        raise ConfigError(f"{where}: preset {name!r} resolves outside the presets folder {folder}; refused")
    if not path.is_file():
        known = [n for n, _ in list_presets()]
        hint = difflib.get_close_matches(stem, known, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{where}: preset {name!r} not found in {folder} (known: {', '.join(known) or 'none'}){extra}")
    return path


def _read_yaml(path: Path, label: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read: {exc}") from None
    try:
        data = safe_load(text)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{label}:{exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{label}{line}: {exc.problem} (rlctl reads YAML with safe_load: Python object tags such as "
            f"!!python/object are refused)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{label}{line}: invalid YAML: {problem}") from None
    except (ValueError, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{label}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


@dataclass
class _Layer:
    kind: str  # "preset" | "config" | "override"
    label: str
    data: dict


def _compose(path: Path, label: str, kind: str, stack: tuple[Path, ...]) -> list[_Layer]:
    if path in stack:
        chain = " -> ".join(p.stem for p in (*stack, path))
        raise ConfigError(f"{label}: defaults cycle: {chain}")
    data = _read_yaml(path, label)
    layers: list[_Layer] = []
    defaults = data.pop("defaults", None)
    if defaults is not None:
        if isinstance(defaults, str):
            defaults = [defaults]
        if not isinstance(defaults, list):
            raise ConfigError(f"{label}: defaults must be a list of preset names, got {_fmt(defaults)}")
        for entry in defaults:
            if entry == "_self_":
                continue
            ppath = _preset_path(entry, f"{label}: defaults")
            layers += _compose(ppath, f"preset {ppath.stem} ({ppath})", "preset", (*stack, path))
    layers.append(_Layer(kind, label, data))
    return layers


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _is_text_field(info: Any) -> bool:
    """True when the field holds a single string (str, Literal of strings, or Optional of those)."""
    tp = _unwrap(info.annotation)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else [tp]
    if len(args) != 1:
        return False
    a = _unwrap(args[0])
    if a is str:
        return True
    if typing.get_origin(a) is Literal:
        return all(isinstance(x, str) for x in typing.get_args(a))
    return False


def _is_optional(info: Any) -> bool:
    tp = _unwrap(info.annotation)
    return typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)


def _safe_yaml_value(text: str) -> Any:
    return safe_load(text)


def _parse_override(item: Any) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {_redact_override(item)!r}: expected key=value, e.g. trainer.seed=1")
    key, _, text = item.partition("=")
    key = key.strip()
    if key.startswith("+"):  # Hydra's "add a key" marker: rlctl keys always exist
        key = key[1:]
    if not _KEY_RE.fullmatch(key):
        raise ConfigError(f"override {_redact_override(item)!r}: {key!r} is not a dotted key path, e.g. trainer.seed=1")
    _, info = _field_info(key)
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    if info is not None and _is_text_field(info):
        literal = typing.get_origin(_unwrap(info.annotation)) is Literal
        if (_is_optional(info) or literal) and text.strip() in ("null", "~", "None", ""):
            return key, None
        if quoted:
            try:
                val = safe_load(text)
                if isinstance(val, str):
                    return key, val
            except yaml.YAMLError:
                pass
        return key, text
    shown = REDACTED if _is_secret_path(key) else _redact_text(text)
    try:
        return key, _safe_yaml_value(text)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{key}: override value {shown!r} has a {exc.problem.split(' (first on line')[0]}") from None
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(f"{key}: override value {shown!r} refused: {exc.problem} (YAML is read with safe_load)") from None
    except (yaml.YAMLError, ValueError, RecursionError, OverflowError) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{key}: override value {shown!r} is not valid YAML ({problem}); quote it") from None



def _label_with_line(label: str, line: Optional[int]) -> str:
    """``file`` -> ``file:line``; ``preset x (path)`` -> ``preset x (path:line)``."""
    if line is None:
        return label
    return f"{label[:-1]}:{line})" if label.endswith(")") and " (" in label else f"{label}:{line}"


def _leaf_line(d: Any, path: str) -> Optional[int]:
    """The 1-based line of key ``path`` in a mapping loaded from YAML (None when not from a file)."""
    *parents, last = path.split(".")
    for part in parents:
        d = d.get(part) if isinstance(d, dict) else None
    return getattr(d, "key_lines", {}).get(last) if isinstance(d, dict) else None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and _field_info(path)[0] is not None:
            out.update(_flatten(v, path + "."))
        elif isinstance(v, dict) and _field_info(path)[0] is not None:
            continue
        else:
            out[path] = v
    return out


_ALL_LEAVES = list(LEAF_DEFAULTS)


# names users bring from other trainers (TRL, HF Trainer, verl) for rlctl's keys
_SYNONYMS = {
    "learning_rate": "trainer.policy.optimizer_config.lr",
    "max_grad_norm": "trainer.policy.optimizer_config.max_grad_norm",
    "num_generations": "generator.n_samples_per_prompt",
    "max_completion_length": "generator.sampling_params.max_new_tokens",
    "max_prompt_length": "trainer.max_prompt_length",
    "beta": "trainer.algorithm.kl_loss_coef",
    "epsilon": "trainer.algorithm.eps_clip_low",
    "rollout_n": "generator.n_samples_per_prompt",
    "model_name_or_path": "trainer.policy.model.path",
}


def _suggest(path: str, siblings: list[str]) -> str:
    prefix, _, last = path.rpartition(".")
    pre = f"{prefix}." if prefix else ""
    if last in _SYNONYMS and _SYNONYMS[last] != path:
        return f"; did you mean {_SYNONYMS[last]}?"
    # 1) a close sibling, 2) a leaf elsewhere with the same or a close last segment, 3) a looser sibling
    close = difflib.get_close_matches(last, siblings, n=1, cutoff=0.8)
    if close:
        return f"; did you mean {pre}{close[0]}?"
    by_last: dict[str, list[str]] = {}
    for p in _ALL_LEAVES:
        by_last.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    for name in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75):
        return f"; did you mean {by_last[name][0]}?"
    close = difflib.get_close_matches(last, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {pre}{close[0]}?"
    return ""


def _dict_leaves(d: dict, prefix: str) -> list[tuple[str, Any]]:
    """``[("prefix.a.b", value), ...]`` for the non-dict values of a nested dict (at most 2 are needed;
    none when a nested key is not a plain name)."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            return []
        if isinstance(v, dict) and v:
            sub = _dict_leaves(v, f"{prefix}.{k}")
            if not sub:
                return []
            out += sub
        else:
            out.append((f"{prefix}.{k}", v))
        if len(out) > 1:
            break
    return out


def _check_keys(d: dict, layer: _Layer, errors: list[str], model: type[BaseModel] = RunConfig, prefix: str = "") -> dict:
    """Drop (and report) keys that are neither schema fields nor handled vLLM names."""
    out = _LineDict()
    out.key_lines = getattr(d, "key_lines", {})  # kept for errors that name file:line
    extra = COMPAT_TABLES.get(prefix.rstrip("."), {})
    names = list(model.model_fields) + list(extra)
    for k, v in d.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            errors.append(f"{layer.label}: key {k!r} under {prefix.rstrip('.') or 'the top level'} is not a valid key name; keys are names like {names[0]}")
            continue
        path = f"{prefix}{k}"
        info = model.model_fields.get(k)
        if info is None and k not in extra:
            line = getattr(d, "key_lines", {}).get(k)
            # the source as every other error names it (_Collector.src): " [file:line]" at the end
            where = "" if layer.kind == "override" else f" [{_label_with_line(layer.label, line)}]"
            hint = _suggest(path, names)
            leaves = _dict_leaves(v, path) if isinstance(v, dict) else []
            if len(leaves) == 1:  # a.typo.b.c=x: echo what was typed, suggest the whole corrected path
                leaf, leaf_v = leaves[0]
                fixed = hint.removeprefix("; did you mean ").removesuffix("?") + leaf[len(path):] if hint else ""
                if fixed in LEAF_DEFAULTS:
                    hint = f"; did you mean {fixed}?"
                errors.append(f"{_kv(leaf, leaf_v)}: unknown key {path}{hint}; remove or rename it{where}")
            else:
                errors.append(f"{_kv(path, v)}: unknown key{hint}; remove or rename it{where}")
            continue
        sub = _submodel(info.annotation) if info is not None else None
        if sub is not None and v is None:  # an empty YAML section ("trainer:") means no keys
            continue
        if sub is not None and isinstance(v, dict):
            out[k] = _check_keys(v, layer, errors, sub, path + ".")
        else:
            out[k] = v
    return out



def _value_below(layers: list, path: str, top: Optional[int]) -> Optional[tuple[str, Any]]:
    """``(layer label, value)`` of the last layer below ``layers[top]`` that sets ``path``, or None."""
    if top is None:
        return None
    for layer in reversed(layers[:top]):
        if _has(layer.data, path):
            return _short_label(layer.label), _get(layer.data, path)
    return None



# --------------------------------------------------------------------------------------------------
# load_config
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedConfig:
    """A validated config plus what check-config reports about it."""

    cfg: RunConfig
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    explicit: set[str] = field(default_factory=set)  # key paths set by a preset/config/override
    sources: list[str] = field(default_factory=list)  # layer labels, lowest precedence first
    preset: Optional[str] = None


def load_config(
    preset: Optional[str] = None,
    config_file: Optional[str | Path] = None,
    overrides: Any = (),
    backend: Optional[str] = None,
    for_training: bool = False,
) -> LoadedConfig:
    """Resolve defaults < preset < config file < overrides (+ backend), validate, and apply the rules.

    ``for_training=True`` turns missing data files, a missing local model folder and a missing
    custom reward file into errors (``check-config`` reports them as warnings).

    Raises:
        ConfigError: every problem found, one line each.
    """
    try:
        return _load(preset, config_file, overrides, backend, for_training)
    except ConfigError as exc:
        raise ConfigError([_redact_text(e) for e in exc.errors], cfg=exc.cfg, unsure=exc.unsure) from None
    except RecursionError:
        raise ConfigError("configuration: nested too deeply") from None


def _load(preset, config_file, overrides, backend, for_training) -> LoadedConfig:
    errors: list[str] = []
    layers: list[_Layer] = []
    if preset is not None:
        try:
            path = _preset_path(preset, "--preset")
            layers += _compose(path, f"preset {path.stem} ({path})", "preset", ())
        except ConfigError as exc:
            errors += exc.errors
    if config_file is not None:
        cpath = Path(expand_path(str(config_file)))
        try:
            layers += _compose(cpath.resolve() if cpath.exists() else cpath, str(config_file), "config", ())
        except ConfigError as exc:
            errors += exc.errors
    # a preset is composed once (as Hydra does): a --config file whose defaults list the base preset that
    # --preset already composed (the seed's "defaults: - ppo_base_config") must not undo the preset's values
    seen: set[str] = set()
    repeated: list[str] = []
    kept: list[_Layer] = []
    for layer in layers:
        if layer.kind == "preset" and layer.label in seen:
            repeated.append(_short_label(layer.label))
            continue
        seen.add(layer.label)
        kept.append(layer)
    layers = kept
    if isinstance(overrides, str):
        overrides = [overrides]
    items = list(overrides or ())
    if backend is not None:
        items.append(("--backend", f"generator.backend={backend}"))
    for item in items:
        label, text = item if isinstance(item, tuple) else (f"override {_redact_override(item)!r}", item)
        try:
            key, value = _parse_override(text)
            layers.append(_Layer("override", label, _nest(key, value)))
        except ConfigError as exc:
            errors += exc.errors

    # a preset, file or override that could not be read: only the keys the command line set are known for sure
    unread = bool(errors)
    # known keys, per layer (so errors name the file)
    for layer in layers:
        layer.data = _check_keys(layer.data, layer, errors)

    raw: dict = {}
    explicit: set[str] = set()
    sources: dict[str, str] = {}
    source_at: dict[str, int] = {}  # key path -> index of the layer that set it last
    source_group: dict[str, int] = {}  # the same, but all command-line overrides count as one layer
    for i, layer in enumerate(layers):
        raw = _merge(raw, layer.data)
        for path, value in _flatten(layer.data).items():
            line = _leaf_line(layer.data, path) if layer.kind != "override" else None
            sources[path] = _label_with_line(layer.label, line)
            source_at[path] = i
            source_group[path] = len(layers) if layer.kind == "override" else i
            if layer.kind != "preset" or path not in LEAF_DEFAULTS or LEAF_DEFAULTS[path] != value:
                explicit.add(path)

    c = _Collector(explicit, sources, source_group)
    c.notes += [f"{name} is listed in the defaults of {config_file} but was already composed by --preset "
                f"{preset}; applied once, at its first place" for name in dict.fromkeys(repeated)]
    c.errors += errors
    _normalize(raw, c, "sglang")

    # deterministic run name
    seed = _get(raw, "trainer.seed", 42)
    seed_s = str(seed) if isinstance(seed, int) else "42"
    stem = Path(str(preset)).stem if preset is not None else "custom"
    default_run_name = re.sub(r"[^A-Za-z0-9_.+=@,-]", "_", f"{stem}-seed{seed_s}")
    if _get(raw, "trainer.run_name") is None and isinstance(raw.get("trainer", {}), dict):
        _set(raw, "trainer.run_name", default_run_name)

    # Validate. Leaves with type errors are reported, then replaced by their defaults so that the
    # rules still run on everything else (all errors in one message); rule errors that mention a
    # replaced key are dropped, since they would talk about the default rather than the user's value.
    cfg: Optional[RunConfig] = None
    repaired: set[str] = set()
    for _attempt in range(4):
        try:
            cfg = RunConfig.model_validate(raw)
            break
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                path, value, msg = _rewrite_error(err)
                base = path.split("[")[0]
                if base not in repaired and base not in c.reported:
                    hint = f"; the default is {_fmt(LEAF_DEFAULTS[base])}" if base in LEAF_DEFAULTS else ""
                    if base == "trainer.run_name":  # the schema's null is filled at load time
                        hint = f"; the default is <preset>-seed<seed>, here {default_run_name}"
                    below = _value_below(layers, base, source_at.get(base))
                    if below is not None and below[1] != LEAF_DEFAULTS.get(base, object()):
                        # e.g. the preset's value, which the bad one replaced
                        hint = f"; {below[0]} sets {_kv(base, below[1]).split('=', 1)[1]}"
                    c.errors.append(f"{_kv(path, value)}: {msg}{hint}{c.src(base)}")
                repaired.add(base)
                _pop(raw, base)
    if cfg is not None:
        n_before = len(c.errors)
        _rules(cfg, c, for_training)
        if repaired:
            pats = [re.compile(r"(^|[\s.(=])" + re.escape(p.rsplit(".", 1)[-1]) + r"\b") for p in repaired]
            new_errors = [e for e in c.errors[n_before:] if not any(p.search(e.split(":", 1)[-1]) or e.startswith(r) for p, r in zip(pats, repaired))]
            c.errors[n_before:] = new_errors
    if c.errors:
        if cfg is not None and not repaired and all(e in c.machine for e in c.errors):
            raise ConfigError(c.errors, cfg=cfg)  # the user's configuration, valid but for this machine
        # the keys an error starts with ("trainer.device=x: ...", "trainer.device: override value ...")
        named = {m.group(1) for e in c.errors if (m := re.match(r"([A-Za-z_][\w.]*)(?:\[\d+\])?[=:]", e))}
        if unread:
            named |= set(LEAF_DEFAULTS) - {p for layer in layers if layer.kind == "override" for p in _flatten(layer.data)}
        raise ConfigError(c.errors, cfg=cfg, unsure=repaired | named)
    assert cfg is not None
    return LoadedConfig(
        cfg=cfg,
        notes=[_redact_text(n) for n in c.notes],
        warnings=[_redact_text(w) for w in c.warnings],
        explicit=explicit,
        sources=[layer.label for layer in layers],
        preset=preset,
    )
