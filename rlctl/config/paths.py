"""Path handling for config values: ``$VAR`` / ``~`` expansion, hub-name versus local-folder detection,
existence checks that never raise, and a model's ``config.json`` found without network access.

Tests: ``pytest tests/unit/test_config.py -k "expand or sample_data or model_path"``.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Optional

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


def find_config_json(model_path: str) -> Optional[Path]:
    """The ``config.json`` of a model, without network access.

    ``model_path`` is a local folder (``~`` and ``$VARS`` expanded) holding ``config.json``, a path to a
    ``config.json`` file, or a hub name ``Org/Name`` looked up in the Hugging Face hub cache:
    ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; inside it
    ``models--Org--Name/snapshots/<rev>/config.json``, the revision ``refs/main`` names when it exists,
    else the newest snapshot. Returns None when nothing is found.
    """
    p = Path(os.path.expandvars(os.path.expanduser(model_path)))
    if p.is_file() and p.name == "config.json":
        return p
    if p.is_dir():
        return p / "config.json" if (p / "config.json").is_file() else None
    parts = model_path.strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        return None
    if os.environ.get("HF_HUB_CACHE"):
        cache = Path(os.environ["HF_HUB_CACHE"]).expanduser()
    elif os.environ.get("HF_HOME"):
        cache = Path(os.environ["HF_HOME"]).expanduser() / "hub"
    else:
        cache = Path.home() / ".cache" / "huggingface" / "hub"
    repo = cache / f"models--{parts[0]}--{parts[1]}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        cand = repo / "snapshots" / ref.read_text(encoding="utf-8").strip() / "config.json"
        if cand.is_file():
            return cand
    found = [Path(f) for f in glob.glob(str(glob.escape(repo) + "/snapshots/*/config.json"))]
    return max(found, key=lambda f: f.stat().st_mtime) if found else None
