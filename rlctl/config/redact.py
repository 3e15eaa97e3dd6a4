"""Secret redaction, and values as shown in messages.

A secret-looking key (``hf_token``, ``*_api_key``, ``*_access_key``, ``password``, ``secrets.*``; not
``answer_key`` or ``prompt_key``) has its value replaced by
:data:`REDACTED`; so do the values of ``$WANDB_API_KEY`` / ``$HF_TOKEN`` / ``$HUGGING_FACE_HUB_TOKEN``
and passwords in URLs, wherever they appear in a config, a message or a source label.

Tests: ``pytest tests/unit/test_config.py -k redact tests/unit/test_cli.py``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

REDACTED = "***REDACTED***"


_SECRET_ANY = {"secret", "secrets", "password", "passwd", "pwd", "passphrase", "credential", "credentials",
               "authorization", "bearer"}
_SECRET_LAST = {"token", "apikey", "accesskey", "secretkey", "privatekey", "auth"}
# a last segment ``key`` is a secret (``key``, ``wandb_key``, ``openai_key``, ``api_key``) unless the word before it
# names a data column or a lookup, as SkyRL's ``input_key``-style keys do: those values are shown in messages.
# Unknown words stay secret: a printed secret cannot be taken back, a redacted column name costs little.
_COLUMN_KEY_BEFORE = {"answer", "sort", "prompt", "reward", "input", "output", "label", "dedup", "primary", "foreign",
                      "group", "partition", "join", "index", "lookup", "column", "field", "text", "solution", "question",
                      "target", "response", "data", "dataset", "cache", "hash", "dict", "map", "order", "split", "id"}
_ENV_SECRETS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# scheme://[user]:password@host -- the password may itself hold '@' (the last '@' before the path ends it)
_URL_CRED_RE = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]*:)[^/\s]+@")


def is_secret_key(key: Any) -> bool:
    """Secret-looking key: a segment secret/password/..., a last segment token/apikey/auth, or a last segment
    ``key`` unless the word before it names a data column (:data:`_COLUMN_KEY_BEFORE`).

    ``hf_token``, ``wandb_api_key``, ``wandb_key``, ``password``, ``client_secret`` and ``aws_access_key`` are
    secrets; ``max_new_tokens``, ``stop_token_ids``, ``answer_key`` and ``prompt_key`` are not.
    """
    if not isinstance(key, str):
        return False
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)  # camelCase -> camel_Case
    segs = [x for x in re.split(r"[^A-Za-z0-9]+", s.lower()) if x]
    if not segs:
        return False
    if any(x in _SECRET_ANY for x in segs) or segs[-1] in _SECRET_LAST:
        return True
    return segs[-1] == "key" and (len(segs) == 1 or segs[-2] not in _COLUMN_KEY_BEFORE)


def _redact_override(item: Any) -> Any:
    """``key=value`` as shown in messages and source labels: a secret-looking key's value redacted."""
    if isinstance(item, str) and "=" in item:
        key, _, value = item.partition("=")
        if _is_secret_path(key.strip()) and value:
            return f"{key}={REDACTED}"
        return _redact_text(item)
    return _redact_text(item) if isinstance(item, str) else item


def _redact_text(text: str) -> str:
    for name in _ENV_SECRETS:
        val = os.environ.get(name)
        if val and len(val) >= 4:
            text = text.replace(val, REDACTED)
    return _URL_CRED_RE.sub(rf"\1{REDACTED}@", text)


def redact(d: Any) -> Any:
    """A copy of ``d`` with secret-looking keys' values and the environment's secret values replaced."""
    if isinstance(d, dict):
        return {k: (REDACTED if is_secret_key(k) and v is not None else redact(v)) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return type(d)(redact(v) for v in d)
    if isinstance(d, str):
        return _redact_text(d)
    return d


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        if v == "" or v != v.strip() or any(c in v for c in " ,:#[]{}\n'\""):
            return json.dumps(v)
        return v
    try:
        text = json.dumps(v, default=str)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 200 else text[:197] + "..."


def _is_secret_path(path: str) -> bool:
    """Any segment of a dotted key path looks secret (``hf_token``, ``secrets.github``, ``wandb.api_key``)."""
    return any(is_secret_key(part) for part in str(path).split("."))


def _kv(path: str, value: Any) -> str:
    """``path=value`` for messages; the value under a secret-looking key (``hf_token``, ``*_api_key``,
    ``secrets.*``, ...) is shown as ``***REDACTED***``, whether or not the key exists in the schema, and
    so are secret-looking keys inside a mapping value and the environment's secret values."""
    if value is not None and _is_secret_path(path):
        return f"{path}={REDACTED}"
    return f"{path}={_fmt(redact(value))}"
