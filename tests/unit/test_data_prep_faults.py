"""Bad input and failures during writing for rlctl.gsm8k.prepare_gsm8k.

Every failure must raise DataPrepError with "<file>:<line>: <reason>" (for input problems),
write nothing, leave no temp file and keep existing good output files byte-for-byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from rlctl.gsm8k import MAX_LINE_CHARS, DataPrepError, prepare_gsm8k, read_prompts

GOOD = [
    {"question": "Q1: 1+1?", "answer": "1+1=2\n#### 2"},
    {"question": "Q2: 2+2?", "answer": "2+2=4\n#### 4"},
    {"question": "Q3: 3+3?", "answer": "3+3=6\n#### 6"},
    {"question": "Q4: 4+4?", "answer": "4+4=8\n#### 8"},
]


def line(rec: dict) -> bytes:
    return (json.dumps(rec) + "\n").encode()


def good_bytes(n: int = 4) -> bytes:
    return b"".join(line(r) for r in GOOD[:n])


def make_src(tmp_path: Path, train: bytes | None = None, test: bytes | None = None) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "train.jsonl").write_bytes(good_bytes() if train is None else train)
    (src / "test.jsonl").write_bytes(good_bytes(2) if test is None else test)
    return src


def snapshot(d: Path) -> dict[str, str]:
    """File name -> sha256 of everything in ``d`` (hidden temp files included)."""
    if not d.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture
def prepared(tmp_path):
    """An output folder holding good files from an earlier run, plus its snapshot."""
    out = tmp_path / "out"
    good_src = tmp_path / "good_src"
    good_src.mkdir()
    (good_src / "train.jsonl").write_bytes(good_bytes())
    (good_src / "test.jsonl").write_bytes(good_bytes(2))
    prepare_gsm8k(out, good_src)
    snap = snapshot(out)
    assert sorted(snap) == ["train.parquet", "validation.parquet"]
    return out, snap


# line 3 of train.jsonl is bad in each case: (train.jsonl bytes, expected message fragment)
BAD_TRAIN = {
    "invalid_json": (
        good_bytes(2) + b'{"question": "q", "answer": \n' + line(GOOD[3]),
        "train.jsonl:3: invalid JSON",
    ),
    "non_utf8": (
        good_bytes(2) + b'{"question": "caf\xe9?", "answer": "#### 1"}\n' + line(GOOD[3]),
        "train.jsonl:3: not valid UTF-8 (byte 0xe9",
    ),
    "empty_line_in_middle": (
        good_bytes(2) + b"\n" + line(GOOD[3]),
        "train.jsonl:3: empty line in the middle of the file",
    ),
    "whitespace_line_in_middle": (
        good_bytes(2) + b"   \t\n" + line(GOOD[3]),
        "train.jsonl:3: empty line in the middle of the file",
    ),
    "missing_key": (
        good_bytes(2) + line({"question": "q"}) + line(GOOD[3]),
        "train.jsonl:3: missing key 'answer'",
    ),
    "missing_question": (
        good_bytes(2) + line({"answer": "#### 1"}),
        "train.jsonl:3: missing key 'question'",
    ),
    "non_string_field": (
        good_bytes(2) + line({"question": 5, "answer": "#### 5"}),
        "train.jsonl:3: field 'question' must be a string, got int",
    ),
    "null_field": (
        good_bytes(2) + line({"question": "q", "answer": None}),
        "train.jsonl:3: field 'answer' must be a string, got NoneType",
    ),
    "empty_field": (
        good_bytes(2) + line({"question": "  ", "answer": "#### 5"}),
        "train.jsonl:3: field 'question' is empty",
    ),
    "not_an_object": (
        good_bytes(2) + b'["question", "answer"]\n',
        "train.jsonl:3: expected a JSON object, got list",
    ),
    "gold_without_marker": (
        good_bytes(2) + line({"question": "q", "answer": "the answer is 72"}) + line(GOOD[3]),
        "train.jsonl:3: answer has no '####' final-answer marker",
    ),
    "gold_marker_without_number": (
        good_bytes(2) + line({"question": "q", "answer": "#### seventy-two"}),
        "train.jsonl:3: no number after the last '####'",
    ),
    "truncated_last_line": (
        good_bytes(2) + b'{"question": "q", "answer": "1+1=2\\n###',
        "train.jsonl:3: truncated last line",
    ),
    "line_too_long": (
        good_bytes(2) + line({"question": "x" * MAX_LINE_CHARS, "answer": "#### 1"}),
        f"train.jsonl:3: line longer than {MAX_LINE_CHARS} characters",
    ),
    "line_too_long_multibyte": (
        good_bytes(2) + line({"question": "\u00e9" * MAX_LINE_CHARS, "answer": "#### 1"}).replace(
            b"\\u00e9", "\u00e9".encode()
        ),
        f"train.jsonl:3: line longer than {MAX_LINE_CHARS} characters",
    ),
    "line_huge": (
        good_bytes(2) + b'{"question": "' + b"y" * (5 * MAX_LINE_CHARS) + b'", "answer": "#### 1"}\n',
        f"train.jsonl:3: line longer than {MAX_LINE_CHARS} characters",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_train_line_writes_nothing(tmp_path, case):
    data, fragment = BAD_TRAIN[case]
    src = make_src(tmp_path, train=data)
    out = tmp_path / "fresh"
    with pytest.raises(DataPrepError) as ei:
        prepare_gsm8k(out, src)
    assert fragment in str(ei.value)
    assert str(ei.value).startswith(str(src / "train.jsonl") + ":3: ")
    assert not out.exists()  # not even the folder is created


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_train_line_keeps_existing_files(tmp_path, prepared, case):
    out, snap = prepared
    data, fragment = BAD_TRAIN[case]
    src = make_src(tmp_path, train=data)
    with pytest.raises(DataPrepError, match="train.jsonl:3: "):
        prepare_gsm8k(out, src)
    assert snapshot(out) == snap  # same files, same bytes, no temp files


def test_bad_test_split_line(tmp_path, prepared):
    out, snap = prepared
    src = make_src(tmp_path, test=line(GOOD[0]) + b"{oops}\n")
    with pytest.raises(DataPrepError, match=r"test.jsonl:2: invalid JSON"):
        prepare_gsm8k(out, src)
    assert snapshot(out) == snap


def test_line_of_exactly_max_chars_is_accepted(tmp_path):
    rec = {"question": "", "answer": "#### 1"}
    overhead = len(json.dumps(rec))
    rec["question"] = "z" * (MAX_LINE_CHARS - overhead)
    data = line(rec)
    assert len(data) == MAX_LINE_CHARS + 1
    src = make_src(tmp_path, train=data)
    assert prepare_gsm8k(tmp_path / "out", src)["train"] == 1


def test_last_line_without_newline_is_accepted(tmp_path):
    src = make_src(tmp_path, train=good_bytes().rstrip(b"\n"))
    assert prepare_gsm8k(tmp_path / "out", src) == {"train": 4, "validation": 2}


def test_trailing_blank_lines_and_crlf_are_accepted(tmp_path):
    src = make_src(tmp_path, train=good_bytes().replace(b"\n", b"\r\n") + b"\n\n")
    assert prepare_gsm8k(tmp_path / "out", src) == {"train": 4, "validation": 2}
    rows = read_prompts([str(tmp_path / "out" / "train.parquet")])
    assert [r["answer"] for r in rows] == ["2", "4", "6", "8"]


def test_empty_file(tmp_path):
    src = make_src(tmp_path, train=b"")
    with pytest.raises(DataPrepError, match=r"train.jsonl:1: file has no records"):
        prepare_gsm8k(tmp_path / "out", src)
    src = make_src(tmp_path, train=b"\n\n")
    with pytest.raises(DataPrepError, match=r"train.jsonl:1: file has no records"):
        prepare_gsm8k(tmp_path / "out", src)


def test_missing_source_file(tmp_path):
    src = make_src(tmp_path)
    (src / "test.jsonl").unlink()
    with pytest.raises(DataPrepError, match=r"test.jsonl: file not found"):
        prepare_gsm8k(tmp_path / "out", src)
    assert not (tmp_path / "out").exists()


def test_missing_source_dir(tmp_path):
    with pytest.raises(DataPrepError, match="source folder not found"):
        prepare_gsm8k(tmp_path / "out", tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# Output folder problems
# ---------------------------------------------------------------------------------------------


def test_output_is_a_file(tmp_path):
    src = make_src(tmp_path)
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(DataPrepError, match=r"output folder '.*afile' exists and is not a folder"):
        prepare_gsm8k(f, src)
    with pytest.raises(DataPrepError, match=r"cannot create output folder '.*afile/sub'"):
        prepare_gsm8k(f / "sub", src)


def test_output_not_writable_probe(tmp_path, monkeypatch):
    import tempfile

    src = make_src(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", deny)
    with pytest.raises(DataPrepError, match=r"output folder '.*ro' is not writable: Permission denied"):
        prepare_gsm8k(out, src)
    assert list(out.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_output_not_writable_chmod(tmp_path):
    src = make_src(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(DataPrepError, match="is not writable"):
            prepare_gsm8k(out, src)
    finally:
        out.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# Failures while writing
# ---------------------------------------------------------------------------------------------


def _partial_then(exc: BaseException, fail_on_call: int):
    """A write_table stand-in: real writes until call ``fail_on_call``, which writes junk and raises."""
    import pyarrow.parquet as pq

    real = pq.write_table
    calls = {"n": 0}

    def fake(table, where, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < fail_on_call:
            return real(table, where, *args, **kwargs)
        with open(where, "wb") as f:
            f.write(b"PAR1 half-written")
        raise exc

    return fake, calls


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_keyboard_interrupt_during_write(tmp_path, prepared, monkeypatch, fail_on_call):
    import pyarrow.parquet as pq

    out, snap = prepared
    src = make_src(tmp_path, train=good_bytes(3))  # different content from the prepared files
    fake, calls = _partial_then(KeyboardInterrupt(), fail_on_call)
    monkeypatch.setattr(pq, "write_table", fake)
    with pytest.raises(KeyboardInterrupt):
        prepare_gsm8k(out, src)
    assert calls["n"] == fail_on_call
    assert snapshot(out) == snap  # old files intact, no temp files


def test_keyboard_interrupt_fresh_folder_leaves_no_files(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    src = make_src(tmp_path)
    out = tmp_path / "fresh"
    fake, _ = _partial_then(KeyboardInterrupt(), 2)
    monkeypatch.setattr(pq, "write_table", fake)
    with pytest.raises(KeyboardInterrupt):
        prepare_gsm8k(out, src)
    assert list(out.iterdir()) == []


def test_disk_full_during_write(tmp_path, prepared, monkeypatch):
    import pyarrow.parquet as pq

    out, snap = prepared
    src = make_src(tmp_path, train=good_bytes(3))
    fake, _ = _partial_then(OSError(28, "No space left on device"), 2)
    monkeypatch.setattr(pq, "write_table", fake)
    with pytest.raises(DataPrepError, match=r"cannot write '.*validation.parquet': No space left on device"):
        prepare_gsm8k(out, src)
    assert snapshot(out) == snap


def test_failure_during_rename_leaves_no_temp_files(tmp_path, prepared, monkeypatch):
    out, snap = prepared
    src = make_src(tmp_path, train=good_bytes(3))
    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(a, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        prepare_gsm8k(out, src)
    # Only the window between the two renames can mix old and new files; no temp file remains.
    assert sorted(snapshot(out)) == ["train.parquet", "validation.parquet"]
    assert snapshot(out)["validation.parquet"] == snap["validation.parquet"]
