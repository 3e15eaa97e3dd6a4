"""rlctl's run configuration: one typed schema, its rules, loading with precedence, and redaction.

Everything here is pure Python (pydantic + PyYAML): importing this package never imports torch, ray
or sglang, so ``rlctl check-config`` validates a run in well under a second.

Modules (one job each; import the public names from ``rlctl.config``):

- :mod:`~rlctl.config.schema`: the pydantic models (:class:`RunConfig`), the leaves
  (:func:`iter_leaves`, :data:`LEAF_DEFAULTS`) and what each leaf does (:data:`LEAF_EFFECT`).
- :mod:`~rlctl.config.loading`: :func:`load_config`: presets and ``--config`` files, ``key=value``
  overrides, precedence, unknown-key checks, the source (file:line) of every key, validation.
- :mod:`~rlctl.config.compat`: vLLM / SkyRL names that are not rlctl fields (:data:`VLLM_GENERATOR_KEYS`,
  :data:`VLLM_SAMPLING_KEYS`): translated, reported as having no effect, or rejected.
- :mod:`~rlctl.config.rules`: cross-field rules on the validated config, and "has no effect" notes.
- :mod:`~rlctl.config.errors`: :class:`ConfigError`, the problem collector, pydantic error rewriting.
- :mod:`~rlctl.config.redact`: secret redaction (:func:`redact`, :data:`REDACTED`) and message values.
- :mod:`~rlctl.config.yamlio`: safe YAML with the line of every key; :mod:`~rlctl.config.paths`:
  ``$VAR`` / ``~`` expansion; :mod:`~rlctl.config.tree`: dotted-path helpers on nested dicts.

Precedence (lowest first; written once, here and in README "Configuration")::

    schema defaults  <  --preset NAME  <  --config FILE  <  key=value overrides and --backend B

- ``--preset NAME`` reads ``presets/NAME.yaml`` (folder: ``$RLCTL_PRESETS_DIR`` or the package's
  ``presets/``). A preset may list ``defaults: [other, ...]``: those presets are composed first, in
  order, then the preset itself (Hydra's ``_self_`` entry is accepted and ignored). Cycles are errors.
- ``--config FILE`` is composed the same way: its own ``defaults:`` (preset names) first, then the file.
- ``key=value`` overrides are applied in the order given; ``--backend B`` equals
  ``generator.backend=B`` (applied after the overrides).
- Mappings deep-merge; lists and scalars replace.
- Override values are parsed with ``yaml.safe_load`` and then coerced by the field's type: a string
  field keeps the text as written (``trainer.run_name=0123`` stays ``"0123"``), other fields take the
  YAML value (``data.train_data="['a.parquet','b.parquet']"`` becomes a list).

Key names and defaults follow SkyRL's ``ppo_base_config.yaml``; every divergence is marked
``# DIVERGENCE`` in :mod:`~rlctl.config.schema` and listed in the README. vLLM-era names that SkyRL
configs carry (``max_generate_length``, ``enforce_eager``, ``min_tokens``, ...) are not schema fields:
they are translated, reported as having no effect, or rejected (:mod:`~rlctl.config.compat`).

Validation collects every problem into one :class:`ConfigError`; each line starts with the full key
path (or the file), shows the value given and says how to fix it. Notes ("no effect", translations)
are only reported for keys the user set (a preset value that differs from the schema default, or any
value from ``--config`` / the command line).

Tests: ``pytest tests/unit/test_config*.py tests/unit/test_seed.py tests/unit/test_presets.py``.
"""

from __future__ import annotations

import importlib.util  # noqa: F401 - tests patch rlctl.config.importlib.util.find_spec (the wandb check)

from rlctl.config.compat import VLLM_GENERATOR_KEYS, VLLM_SAMPLING_KEYS
from rlctl.config.errors import ConfigError
from rlctl.config.loading import LoadedConfig, list_presets, load_config, presets_dir
from rlctl.config.paths import _looks_like_local_path, expand_path, sample_data_dir  # noqa: F401 - cli.py uses it
from rlctl.config.redact import REDACTED, is_secret_key, redact
from rlctl.config.schema import LEAF_DEFAULTS, LEAF_EFFECT, RunConfig, _value_at, iter_leaves, to_dict  # noqa: F401
from rlctl.config.yamlio import safe_load

__all__ = [
    "RunConfig",
    "ConfigError",
    "LoadedConfig",
    "load_config",
    "redact",
    "to_dict",
    "presets_dir",
    "list_presets",
    "iter_leaves",
    "LEAF_DEFAULTS",
    "LEAF_EFFECT",
    "VLLM_GENERATOR_KEYS",
    "VLLM_SAMPLING_KEYS",
    "REDACTED",
    "expand_path",
    "sample_data_dir",
    "is_secret_key",
    "safe_load",
]
