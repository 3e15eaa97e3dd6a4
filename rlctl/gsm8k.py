"""GSM8K for rlctl: answer extraction, the rule-based reward, data preparation and loading.

One answer extractor is shared by data preparation (the gold answer of each record) and by the
reward (the answer a model wrote), so both sides normalize numbers the same way.

What is here
------------
* :func:`extract_answer` -- pull the final numeric answer out of a text, ``"strict"`` (the number
  right after the last ``####``) or ``"flexible"`` (the last number anywhere), as a canonical
  string (``"$1,234.50"`` -> ``"1234.5"``).
* :func:`extract_gold` -- the gold answer of a GSM8K record's ``answer`` field.
* :func:`score_response` / :class:`RewardResult` -- the GSM8K reward for one response.
* :func:`load_custom_reward` -- import a user reward function from ``"module:function"`` or
  ``"path/to/file.py:function"``.
* :func:`prepare_gsm8k` -- GSM8K (from the Hugging Face hub or from local ``train.jsonl`` /
  ``test.jsonl``) -> ``train.parquet`` + ``validation.parquet``; validates every line before
  writing anything, writes atomically, and is byte-for-byte reproducible.
* :func:`read_prompts` -- load prepared parquet files as a list of row dicts for the trainer.
* :data:`SAMPLE_DIR` -- a bundled 64/32-row sample (``rlctl/data/gsm8k_sample``) so the CPU
  demo runs offline; ``scripts/make_gsm8k_sample.py`` regenerates it.

Importing this module is cheap: it imports neither torch, ray, sglang, ``datasets`` nor pyarrow
(those are imported inside the functions that need them), so ``rlctl check-config`` stays fast.

Testing
-------
``pytest tests/unit/test_gsm8k.py tests/unit/test_data_prep_faults.py`` (a few seconds, CPU only,
offline). The tests that need the full GSM8K release read ``../shared/data/gsm8k`` relative to
the repository root and are skipped when it is absent.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "PROMPT_SUFFIX",
    "SAMPLE_DIR",
    "DATA_SOURCE",
    "ENV_CLASS",
    "MAX_LINE_CHARS",
    "DataPrepError",
    "RewardResult",
    "extract_answer",
    "extract_gold",
    "normalize_number",
    "score_response",
    "load_custom_reward",
    "prepare_gsm8k",
    "read_prompts",
]

logger = logging.getLogger(__name__)

#: Appended to every GSM8K question to form the user prompt.
PROMPT_SUFFIX = ' Let\'s think step by step and output the final answer after "####".'
#: Where ``rlctl prepare-data gsm8k`` writes by default (``~`` is expanded by :func:`prepare_gsm8k`).
DEFAULT_OUTPUT_DIR = "~/data/gsm8k"
#: Bundled sample: ``train.parquet`` (first 64 train rows), ``validation.parquet`` (first 32 test rows).
SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "gsm8k_sample"
#: Value of the ``data_source`` column.
DATA_SOURCE = "openai/gsm8k"
#: Value of the ``env_class`` column.
ENV_CLASS = "gsm8k"
#: Longest accepted input line, in characters (excluding the newline).
MAX_LINE_CHARS = 100_000

#: Output file name -> GSM8K source split.
_SPLITS: dict[str, str] = {"train": "train", "validation": "test"}
_COLUMNS = ("prompt", "answer", "data_source", "env_class", "split", "index", "raw_answer")
_REQUIRED_READ_COLUMNS = ("prompt", "answer")


class DataPrepError(ValueError):
    """Bad GSM8K input or an output folder that cannot be written.

    For input problems the message is ``"<file>:<line>: <reason>"`` (line numbers start at 1).
    """


class DownloadError(DataPrepError):
    """The Hugging Face hub could not be reached or did not deliver the dataset (a runtime failure,
    not bad input: ``rlctl prepare-data`` exits 1 for it, 2 for the other :class:`DataPrepError`)."""


# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

# A number: optional sign (only when not glued to a preceding word/number, so "10-12" is 12,
# not -12), optional "$", digits with proper thousands separators or plain digits, optional
# decimals. A trailing "." without digits ("42.") is not part of the number.
_MINUS = "-\u2212"  # ASCII hyphen-minus and U+2212 MINUS SIGN
_NUMBER = (
    # sign: glued to the digits, and not glued to a preceding word, number or separator
    rf"(?:(?<![^\W_])(?<![{_MINUS}.])(?P<sign>[{_MINUS}]))?"
    # "$", optionally followed by a sign ("$-3")
    rf"(?:\$\s*(?:(?P<sign2>[{_MINUS}]))?)?"
    # digits with well-formed thousands separators, or plain digits; or a bare ".5"
    r"(?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?|(?<!\d)(?P<frac2>\.\d+))"
)
_NUMBER_RE = re.compile(_NUMBER)
# Between "####" and the number only whitespace and markdown emphasis ("**", "*", "__", "_")
# may appear (a "$" is part of the number pattern).
_AFTER_MARKER_RE = re.compile(r"[\s*_]*" + _NUMBER)
_MARKER = "####"


def _canonical(sign: str | None, int_part: str | None, frac: str | None) -> str | None:
    """Canonical text of a matched number, or None if the match holds no digits."""
    if not int_part and not frac:
        return None
    int_digits = (int_part or "").replace(",", "").lstrip("0") or "0"
    frac_digits = (frac or ".")[1:].rstrip("0")
    text = int_digits + ("." + frac_digits if frac_digits else "")
    if sign and text != "0":
        text = "-" + text
    return text


def _match_to_str(m: re.Match[str]) -> str | None:
    return _canonical(
        m.group("sign") or m.group("sign2"), m.group("int"), m.group("frac") or m.group("frac2")
    )


def normalize_number(text: str) -> str | None:
    """Canonical form of a text that is exactly one number, or None if it is not one.

    Accepts the same spellings as :func:`extract_answer` (``"$1,234.50"``, ``"**-3**"``,
    ``"42."``, surrounding whitespace) and returns e.g. ``"1234.5"``, ``"-3"``, ``"42"``.
    """
    stripped = text.strip().strip("*_").strip()
    if stripped.endswith("."):
        stripped = stripped[:-1]
    m = _NUMBER_RE.fullmatch(stripped)
    return _match_to_str(m) if m else None


def extract_answer(text: str, method: Literal["strict", "flexible"] = "strict") -> str | None:
    """Extract the final numeric answer from ``text`` as a canonical string.

    * ``"strict"``: the number right after the **last** ``####`` in the text. Only whitespace,
      ``$`` and markdown emphasis (``*``, ``_``) may sit between the marker and the number;
      if the last ``####`` is not followed by a number the result is None (an earlier
      ``####`` is not used).
    * ``"flexible"``: the last number anywhere in the text.

    Normalization: thousands separators (``1,234`` -> ``1234``), ``$``, a trailing period
    (``42.`` -> ``42``), trailing decimal zeros (``18.0`` -> ``18``, ``2.50`` -> ``2.5``),
    leading zeros (``007`` -> ``7``, ``.5`` -> ``0.5``), markdown emphasis (``**42**``),
    negative numbers (``-3``; U+2212 too; ``-0`` -> ``0``), whitespace. A hyphen glued to a
    preceding word or number is not a sign (``10-12`` -> ``12``).

    Returns None when no number is found. Raises ValueError for an unknown ``method``.
    """
    if method == "strict":
        pos = text.rfind(_MARKER)
        if pos < 0:
            return None
        m = _AFTER_MARKER_RE.match(text, pos + len(_MARKER))
        return _match_to_str(m) if m else None
    if method == "flexible":
        last: str | None = None
        for m in _NUMBER_RE.finditer(text):
            value = _match_to_str(m)
            if value is not None:
                last = value
        return last
    raise ValueError(f"unknown extraction method {method!r}; expected 'strict' or 'flexible'")


def extract_gold(answer: str) -> str:
    """Gold answer of a GSM8K record: the number after the last ``####`` of ``answer``, normalized.

    Raises ValueError if ``answer`` has no ``####`` or no number right after the last one.
    """
    if _MARKER not in answer:
        raise ValueError("answer has no '####' final-answer marker")
    gold = extract_answer(answer, "strict")
    if gold is None:
        tail = answer[answer.rfind(_MARKER) :][:40]
        raise ValueError(f"no number after the last '####' (found {tail!r})")
    return gold


# ---------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    """Outcome of scoring one response.

    ``score``: the reward (a float, unitless). ``formatted``: the response has a number right
    after its last ``####``. ``correct_strict`` / ``correct_flexible``: the strict / flexible
    extraction equals the ground truth.
    """

    score: float
    formatted: bool
    correct_strict: bool
    correct_flexible: bool


def score_response(
    response: str,
    ground_truth: str,
    method: Literal["strict", "flexible"] = "strict",
    correct_score: float = 1.0,
    format_score: float = 0.0,
    flexible_score: float | None = None,
) -> RewardResult:
    """Score one model response against a GSM8K gold answer.

    ``ground_truth`` is normalized like extracted answers (``"1,080"`` equals ``"1080"``); if it
    is not a plain number it is compared as stripped text. The score is ``correct_score`` if the
    answer extracted with ``method`` equals the ground truth, else ``format_score`` if the
    response is formatted (strict extraction found a number), else ``0.0``.

    ``flexible_score`` (only with ``method="strict"``): partial credit for a response whose last
    number is right but that does not end with ``#### <right answer>``; it applies before
    ``format_score``. Used to shape the reward for models that answer correctly in another format
    (Qwen2.5-Coder writes ``\\boxed{}``): strict reward alone gives GRPO almost no group variance.

    Raises ValueError for an unknown ``method``.
    """
    if method not in ("strict", "flexible"):
        raise ValueError(f"unknown extraction method {method!r}; expected 'strict' or 'flexible'")
    truth = normalize_number(ground_truth) or ground_truth.strip()
    strict = extract_answer(response, "strict")
    flexible = extract_answer(response, "flexible")
    correct_strict = strict is not None and strict == truth
    correct_flexible = flexible is not None and flexible == truth
    formatted = strict is not None
    correct = correct_strict if method == "strict" else correct_flexible
    if correct:
        score = float(correct_score)
    elif flexible_score is not None and method == "strict" and correct_flexible:
        score = float(flexible_score)
    elif formatted:
        score = float(format_score)
    else:
        score = 0.0
    return RewardResult(score, formatted, correct_strict, correct_flexible)


def load_custom_reward(spec: str) -> Callable[..., float]:
    """Import a custom reward function from ``"module:function"`` or ``"path/to/file.py:function"``.

    The function is called with keyword arguments only::

        fn(response=str, ground_truth=str, response_ids=list[int]) -> float

    ``response`` is the decoded completion, ``ground_truth`` the row's ``answer`` column and
    ``response_ids`` the completion's token ids; it returns the reward (unitless float).

    A spec whose left side ends in ``.py`` or contains a path separator is loaded as a file
    (``~`` expanded, relative to the current directory); otherwise it is imported as a module
    (which must be importable, e.g. on ``PYTHONPATH``). A file is registered in ``sys.modules``
    under a name derived from its resolved path. In Ray workers, pass the spec string and call
    this function there rather than pickling the returned function.

    Raises ValueError naming the spec on a bad format, a missing module or file, an error while
    importing it, a missing attribute, or an attribute that is not callable.
    """
    if not isinstance(spec, str):
        raise ValueError(f"custom reward spec must be a string, got {type(spec).__name__}")
    target, sep, attr = spec.rpartition(":")
    if not sep or not target.strip() or not attr.strip():
        raise ValueError(
            f"bad custom reward spec {spec!r}: expected 'module:function' or 'path/to/file.py:function'"
        )
    target, attr = target.strip(), attr.strip()
    if not attr.isidentifier():
        raise ValueError(f"bad custom reward spec {spec!r}: {attr!r} is not a valid function name")

    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if is_file:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"custom reward {spec!r}: file {str(path)!r} not found")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        mod_name = f"rlctl_custom_reward_{path.stem}_{digest}"
        try:
            mod_spec = importlib.util.spec_from_file_location(mod_name, path)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_name] = module
            try:
                mod_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the spec named
            raise ValueError(
                f"custom reward {spec!r}: importing {str(path)!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
                raise ValueError(
                    f"custom reward {spec!r}: module {target!r} not found (is it on PYTHONPATH?)"
                ) from exc
            raise ValueError(
                f"custom reward {spec!r}: importing {target!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
        except Exception as exc:  # noqa: BLE001
            raise ValueError(
                f"custom reward {spec!r}: importing {target!r} failed: {type(exc).__name__}: {exc}"
            ) from exc

    if not hasattr(module, attr):
        raise ValueError(f"custom reward {spec!r}: {target!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(
            f"custom reward {spec!r}: {target}.{attr} is a {type(fn).__name__}, not a callable"
        )
    return fn


# ---------------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------------


def _check_record(record: Any, where: str) -> tuple[str, str, str]:
    """Validate one GSM8K record; return (question, raw_answer, gold). ``where`` is "<file>:<line>"."""
    if not isinstance(record, dict):
        raise DataPrepError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if key not in record:
            raise DataPrepError(f"{where}: missing key {key!r}")
        if not isinstance(record[key], str):
            raise DataPrepError(
                f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}"
            )
        if not record[key].strip():
            raise DataPrepError(f"{where}: field {key!r} is empty")
    try:
        gold = extract_gold(record["answer"])
    except ValueError as exc:
        raise DataPrepError(f"{where}: {exc}") from None
    return record["question"], record["answer"], gold


def _read_jsonl(path: Path) -> list[tuple[str, str, str]]:
    """Read and validate a GSM8K JSONL file; raise DataPrepError("<file>:<line>: <reason>")."""
    name = str(path)
    if not path.exists():
        raise DataPrepError(f"{name}: file not found")
    if not path.is_file():
        raise DataPrepError(f"{name}: not a regular file")
    rows: list[tuple[str, str, str]] = []
    blank_line: int | None = None  # first blank line seen after which no record came (yet)
    byte_limit = 4 * MAX_LINE_CHARS + 2  # UTF-8 is at most 4 bytes per character
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataPrepError(f"{name}: cannot open: {exc.strerror or exc}") from None
    with f:
        lineno = 0
        while True:
            raw = f.readline(byte_limit)
            if not raw:
                break
            lineno += 1
            where = f"{name}:{lineno}"
            has_newline = raw.endswith(b"\n")
            if not has_newline and len(raw) >= byte_limit:
                raise DataPrepError(f"{where}: line longer than {MAX_LINE_CHARS} characters")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataPrepError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start})"
                ) from None
            line = line.rstrip("\r\n")
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark (Windows editors) is not data
            if len(line) > MAX_LINE_CHARS:
                raise DataPrepError(
                    f"{where}: line longer than {MAX_LINE_CHARS} characters ({len(line)})"
                )
            if not line.strip():
                if blank_line is None:
                    blank_line = lineno
                continue
            if blank_line is not None:
                raise DataPrepError(f"{name}:{blank_line}: empty line in the middle of the file")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if not has_newline:
                    raise DataPrepError(
                        f"{where}: truncated last line (invalid JSON and no final newline: "
                        f"{exc.msg}, column {exc.colno})"
                    ) from None
                raise DataPrepError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            rows.append(_check_record(record, where))
    if not rows:
        raise DataPrepError(f"{name}:1: file has no records")
    return rows


def _load_local(source_dir: Path) -> dict[str, list[tuple[str, str, str]]]:
    if source_dir.is_file():
        raise DataPrepError(f"{source_dir}: is a file; --source-dir takes the folder that holds train.jsonl and test.jsonl")
    if not source_dir.is_dir():
        raise DataPrepError(
            f"{source_dir}: source folder not found (expected a folder with train.jsonl and test.jsonl)"
        )
    return {split: _read_jsonl(source_dir / f"{split}.jsonl") for split in ("train", "test")}


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (:func:`rlctl.models.hub_unreachable` on the dataset),
    or None, also when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set (``datasets`` then reads its
    cache). ``datasets.load_dataset`` itself retries an unreachable hub for about 25 s before failing.
    """
    from rlctl.models import env_flag, hub_unreachable

    if env_flag("HF_HUB_OFFLINE") or env_flag("HF_DATASETS_OFFLINE"):
        return None
    return hub_unreachable(DATA_SOURCE, "dataset", missing_ok=True)


def _gsm8k_in_cache() -> bool:
    """A copy of openai/gsm8k from an earlier download in the hub or ``datasets`` cache (``load_dataset``
    falls back to it when the hub cannot be reached)."""
    home = Path(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")))
    hub = Path(os.path.expanduser(os.environ.get("HF_HUB_CACHE", str(home / "hub"))))
    ds = Path(os.path.expanduser(os.environ.get("HF_DATASETS_CACHE", str(home / "datasets"))))
    return (hub / "datasets--openai--gsm8k").is_dir() or (ds / "openai___gsm8k").is_dir()


def _load_hub() -> dict[str, list[tuple[str, str, str]]]:
    hint = "pass --source-dir DIR with GSM8K train.jsonl/test.jsonl to prepare the data offline"
    reason = _hub_unreachable()
    if reason is not None and not _gsm8k_in_cache():  # with a cached copy, load_dataset falls back to it
        raise DownloadError(f"could not reach the Hugging Face hub to download {DATA_SOURCE} ({reason}); {hint} "
                            "(or set HF_HUB_OFFLINE=1 to use a copy in the datasets cache)")
    try:
        import datasets  # lazy: heavy import
    except ImportError as exc:
        raise DownloadError(f"downloading {DATA_SOURCE} needs the datasets package ({exc}); pip install datasets, "
                            f"or {hint}") from exc
    try:
        ds = datasets.load_dataset(DATA_SOURCE, "main")
        splits = {split: list(ds[split]) for split in ("train", "test")}
    except Exception as exc:  # noqa: BLE001 - network, auth, cache, missing package, ...
        raise DownloadError(
            f"could not reach the Hugging Face hub to download {DATA_SOURCE} "
            f"({type(exc).__name__}: {exc}); {hint}"
        ) from exc
    out: dict[str, list[tuple[str, str, str]]] = {}
    for split, records in splits.items():
        out[split] = [
            _check_record(rec, f"{DATA_SOURCE}/{split}:{i + 1}") for i, rec in enumerate(records)
        ]
    return out


def _build_table(rows: list[tuple[str, str, str]], split: str):
    import pyarrow as pa

    schema = pa.schema(
        [
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("answer", pa.string()),
            ("data_source", pa.string()),
            ("env_class", pa.string()),
            ("split", pa.string()),
            ("index", pa.int64()),
            ("raw_answer", pa.string()),
        ]
    )
    n = len(rows)
    columns = {
        "prompt": [[{"role": "user", "content": q + PROMPT_SUFFIX}] for q, _, _ in rows],
        "answer": [gold for _, _, gold in rows],
        "data_source": [DATA_SOURCE] * n,
        "env_class": [ENV_CLASS] * n,
        "split": [split] * n,
        "index": list(range(n)),
        "raw_answer": [raw for _, raw, _ in rows],
    }
    return pa.table(columns, schema=schema)


def _prepare_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"output folder {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataPrepError(f"cannot create output folder {str(out)!r}: {exc.strerror or exc}") from None
    # Probe: os.access is unreliable (root, ACLs, read-only mounts), so try to create a file.
    try:
        fd, probe = tempfile.mkstemp(prefix=".rlctl-write-test-", dir=out)
    except OSError as exc:
        raise DataPrepError(f"output folder {str(out)!r} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def _duplicate_count(questions: Iterable[str]) -> int:
    counts = Counter(questions)
    return sum(c - 1 for c in counts.values() if c > 1)


def prepare_gsm8k(output_dir: str | Path, source_dir: str | Path | None = None) -> dict[str, int]:
    """Write GSM8K as ``train.parquet`` and ``validation.parquet`` under ``output_dir``.

    Source: ``source_dir/train.jsonl`` and ``source_dir/test.jsonl`` in the original GSM8K format
    (one ``{"question": ..., "answer": "...#### 72"}`` object per line) when ``source_dir`` is
    given, else ``datasets.load_dataset("openai/gsm8k", "main")``. ``validation.parquet`` is the
    GSM8K test split. ``~`` is expanded in both paths; ``output_dir`` is created if needed.

    Columns: ``prompt`` (``[{"role": "user", "content": question + PROMPT_SUFFIX}]``),
    ``answer`` (gold, normalized by :func:`extract_gold`), ``data_source`` (``"openai/gsm8k"``),
    ``env_class`` (``"gsm8k"``), ``split`` (``"train"``/``"test"``), ``index`` (int64, 0-based
    row number in the source split), ``raw_answer`` (the original solution text).

    Every input line is validated before anything is written; both files are written to temp
    files in ``output_dir`` and moved into place with ``os.replace`` only once both are complete,
    so a failure or Ctrl-C leaves existing files untouched and no temp file behind. Re-running on
    the same input with the same pyarrow version gives byte-identical files.

    Duplicated questions within a split are kept (GSM8K has none, and none shared between train
    and test); they are counted and logged as a warning on the ``rlctl.gsm8k`` logger, as are
    questions that appear in both splits.

    Returns ``{"train": rows, "validation": rows}`` (row counts written).

    Raises DataPrepError (a ValueError): ``"<file>:<line>: <reason>"`` for malformed input
    (invalid JSON, non-UTF-8 bytes, an empty line in the middle, missing key, non-string or empty
    field, gold answer without ``####``, truncated last line, a line over
    :data:`MAX_LINE_CHARS` characters), a missing source file, an output folder that cannot be
    created or written, or -- without ``source_dir`` -- a hub download that failed (the message
    says to pass ``--source-dir DIR``).
    """
    out = Path(output_dir).expanduser()
    if source_dir is not None:
        sources = _load_local(Path(source_dir).expanduser())
    else:
        sources = _load_hub()

    for split, rows in sources.items():
        dups = _duplicate_count(q for q, _, _ in rows)
        if dups:
            logger.warning("gsm8k %s split: %d duplicated question(s) kept", split, dups)
    train_q = {q for q, _, _ in sources["train"]}
    overlap = sum(q in train_q for q, _, _ in sources["test"])
    if overlap:
        logger.warning("gsm8k: %d test question(s) also appear in the train split", overlap)

    tables = {name: _build_table(sources[split], split) for name, split in _SPLITS.items()}
    _prepare_output_dir(out)
    _write_atomically(out, tables)
    return {name: table.num_rows for name, table in tables.items()}


def _write_atomically(out: Path, tables: Mapping[str, Any]) -> None:
    """Write each table to ``out/<name>.parquet`` via temp files; all-or-nothing per call."""
    import pyarrow.parquet as pq

    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    temps: dict[str, str] = {}
    try:
        for name, table in tables.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".parquet.tmp", dir=out)
            os.close(fd)
            temps[name] = tmp
            os.chmod(tmp, mode)  # mkstemp creates 0600; give the usual umask-based mode
            try:
                pq.write_table(table, tmp, compression="zstd")
            except OSError as exc:
                raise DataPrepError(
                    f"cannot write {str(out / (name + '.parquet'))!r}: {exc.strerror or exc}"
                ) from exc
        for name, tmp in temps.items():
            os.replace(tmp, out / f"{name}.parquet")
    except OSError as exc:
        raise DataPrepError(f"cannot write to output folder {str(out)!r}: {exc.strerror or exc}") from exc
    finally:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_prompts(parquet_paths: list[str] | list[Path] | str | Path) -> list[dict]:
    """Load prepared parquet files into one list of row dicts, in file order then row order.

    Each dict has the file's columns, at least ``prompt`` (a list of ``{"role", "content"}``
    chat messages) and ``answer`` (gold answer string); files from :func:`prepare_gsm8k` also
    have ``data_source``, ``env_class``, ``split``, ``index`` and ``raw_answer``. A single path
    is accepted too; ``~`` is expanded.

    Raises DataPrepError naming the file when it is missing, not a readable parquet file, lacks
    a required column, or has a ``prompt`` that is not a list of chat messages; ValueError when
    no path is given.
    """
    if isinstance(parquet_paths, (str, Path)):
        parquet_paths = [parquet_paths]
    paths = [Path(p).expanduser() for p in parquet_paths]
    if not paths:
        raise ValueError("read_prompts: no parquet files given")
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for path in paths:
        if not path.is_file():
            raise DataPrepError(
                f"{path}: prompt file not found (prepare it with `rlctl prepare-data gsm8k` or pass a "
                f"path to a .parquet file)"
            )
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError, ...
            raise DataPrepError(f"{path}: not a readable parquet file: {exc}") from exc
        missing = [c for c in _REQUIRED_READ_COLUMNS if c not in table.column_names]
        if missing:
            raise DataPrepError(
                f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(table.column_names)})"
            )
        file_rows = table.to_pylist()
        for i, row in enumerate(file_rows):
            prompt = row["prompt"]
            if not (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
            ):
                raise DataPrepError(
                    f"{path}: row {i}: 'prompt' must be a non-empty list of {{role, content}} messages"
                )
        rows.extend(file_rows)
    return rows
