"""Path handling for config values: ``$VAR`` / ``~`` expansion, hub-name versus local-folder detection,
and existence checks that never raise.

Tests: ``pytest tests/unit/test_config.py -k "expand or sample_data or model_path"``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_VAR_RE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def sample_data_dir() -> Path:
    """The GSM8K sample bundled with the package (``${RLCTL_SAMPLE_DATA}`` when unset)."""
    import rlctl

    return Path(rlctl.__file__).parent / "data" / "gsm8k_sample"


def expand_path(text: str) -> str:
    """Expand ``$VAR`` / ``${VAR}`` (unset ones are left as written; ``RLCTL_SAMPLE_DATA`` defaults to
    the bundled sample folder) and then a leading ``~``."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in os.environ:
            return os.environ[name]
        if name == "RLCTL_SAMPLE_DATA":
            return str(sample_data_dir())
        return m.group(0)

    return os.path.expanduser(_VAR_RE.sub(sub, text))


def _looks_like_local_path(p: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else (absolute, ./, ~, a/b/c) is a folder."""
    return p.startswith(("/", ".", "~", "$")) or p.count("/") >= 2 or (os.sep != "/" and os.sep in p)


def _exists(p: str, kind: str = "file") -> bool:
    try:
        return Path(p).is_file() if kind == "file" else Path(p).exists()
    except (OSError, ValueError):  # embedded NUL, name too long, ...
        return False
