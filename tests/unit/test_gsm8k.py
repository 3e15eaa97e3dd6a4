"""Tests for rlctl.gsm8k: answer extraction, reward, custom reward loading, data prep, sample."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlctl import gsm8k
from rlctl.gsm8k import (
    PROMPT_SUFFIX,
    SAMPLE_DIR,
    DataPrepError,
    RewardResult,
    extract_answer,
    extract_gold,
    load_custom_reward,
    normalize_number,
    prepare_gsm8k,
    read_prompts,
    score_response,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / ".." / "shared" / "data" / "gsm8k"
needs_shared = pytest.mark.skipif(
    not (SHARED / "train.jsonl").is_file() or not (SHARED / "test.jsonl").is_file(),
    reason=f"full GSM8K release not found at {SHARED}",
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# extract_answer: golden cases
# ---------------------------------------------------------------------------------------------

STRICT_CASES = [
    # plain
    ("#### 72", "72"),
    ("The answer is 5.\n#### 72", "72"),
    # thousands separators
    ("#### 1,234", "1234"),
    ("#### 1,234,567", "1234567"),
    ("#### 109,200,000", "109200000"),
    # dollar
    ("#### $18", "18"),
    ("#### $ 18", "18"),
    ("#### $1,080.00", "1080"),
    # trailing period
    ("#### 42.", "42"),
    ("#### 42.\n", "42"),
    # trailing zeros
    ("#### 18.0", "18"),
    ("#### 18.00", "18"),
    ("#### 2.50", "2.5"),
    ("#### 0.75", "0.75"),
    ("#### .5", "0.5"),
    ("#### 007", "7"),
    # markdown emphasis
    ("#### **42**", "42"),
    ("#### *42*", "42"),
    ("#### __42__", "42"),
    ("#### _42_", "42"),
    ("#### **$1,000.00**.", "1000"),
    # negatives
    ("#### -3", "-3"),
    ("####-3", "-3"),
    ("#### $-3", "-3"),
    ("#### \u22125", "-5"),
    ("#### -0", "0"),
    ("#### -0.0", "0"),
    # whitespace
    ("####    42   ", "42"),
    ("####\n42", "42"),
    ("####\t 42\n", "42"),
    # text after the number is ignored
    ("#### 42 dollars, because 7 * 6 = 42", "42"),
    ("#### 5-3", "5"),
]


@pytest.mark.parametrize("text,expected", STRICT_CASES)
def test_strict_golden(text, expected):
    assert extract_answer(text, "strict") == expected


@pytest.mark.parametrize("text,expected", [c for c in STRICT_CASES if c[0] != "#### 5-3"])
def test_flexible_agrees_when_answer_is_last_number(text, expected):
    # When no other number follows the #### answer, flexible finds the same number.
    assert extract_answer(text, "flexible") == expected


FLEXIBLE_CASES = [
    ("So she has 3 apples and 4 pears, 7 fruits in all.", "7"),
    ("The total is $1,234.50.", "1234.5"),
    ("He ends with -3 points", "-3"),
    ("Temperature: \u221212 degrees", "-12"),
    ("pages 10-12", "12"),  # a hyphen glued to a number is a range, not a sign
    ("item-3", "3"),  # glued to a word: not a sign
    ("The answer is **42**", "42"),
    ("The answer is __42__.", "42"),
    ("x = 18.0", "18"),
    ("costs .5 dollars", "0.5"),
    ("1,2345", "2345"),  # malformed separator: not one number
    ("values 1,-3", "-3"),
    ("#### 5\nActually wait, it is 6.", "6"),
    ("no digits at all", None),
    ("", None),
    ("$", None),
    ("-", None),
    ("####", None),
]


@pytest.mark.parametrize("text,expected", FLEXIBLE_CASES)
def test_flexible_golden(text, expected):
    assert extract_answer(text, "flexible") == expected


def test_strict_uses_last_marker_not_first():
    text = "Draft:\n#### 10\nLet me recheck: 4 + 8 = 12.\n#### 12"
    assert extract_answer(text, "strict") == "12"
    assert extract_answer(text, "flexible") == "12"


def test_strict_last_marker_without_number_is_none():
    # The last #### has no number: an earlier #### is not used as a fallback.
    text = "#### 10\nHmm, not sure.\n#### I don't know"
    assert extract_answer(text, "strict") is None
    assert extract_answer(text, "flexible") == "10"


def test_strict_requires_number_right_after_marker():
    assert extract_answer("#### The answer is 42", "strict") is None
    assert extract_answer("#### The answer is 42", "flexible") == "42"
    assert extract_answer("no marker, answer 42", "strict") is None


def test_answer_deep_inside_long_text():
    # No tail-only heuristics: the #### answer sits before ~20k characters of chatter.
    filler = "Then we keep thinking about the problem without numbers. " * 400
    text = "Step one: 3 + 4 = 7.\n#### 7\n" + filler
    assert len(text) > 20_000
    assert extract_answer(text, "strict") == "7"
    assert extract_answer(text, "flexible") == "7"
    # and a number deep in the middle with later numbers: flexible takes the last one
    text2 = "#### 7\n" + filler + " finally 9 " + filler
    assert extract_answer(text2, "strict") == "7"
    assert extract_answer(text2, "flexible") == "9"


def test_many_markers():
    text = "".join(f"#### {i}\n" for i in range(1000))
    assert extract_answer(text, "strict") == "999"


def test_hashes_run_longer_than_marker():
    assert extract_answer("##### 5", "strict") == "5"


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown extraction method 'loose'"):
        extract_answer("#### 1", "loose")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text,expected",
    [("1,080", "1080"), (" 72 ", "72"), ("$2.50", "2.5"), ("**-3**", "-3"), ("42.", "42"),
     ("abc", None), ("1 2", None), ("", None)],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_roundtrip_integers(n):
    for text in (f"#### {n:,}", f"#### ${n}", f"#### **{n}**", f"#### {n}.00", f"#### {n}."):
        assert extract_answer(text, "strict") == str(n), text
    assert extract_answer(f"so the total is {n:,}.", "flexible") == str(n)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_never_crashes_and_is_canonical(text):
    for method in ("strict", "flexible"):
        out = extract_answer(text, method)
        if out is not None:
            assert normalize_number(out) == out  # canonical form is a fixed point


# ---------------------------------------------------------------------------------------------
# extract_gold
# ---------------------------------------------------------------------------------------------


def test_extract_gold():
    assert extract_gold("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert extract_gold("blah\n#### 1,080") == "1080"
    assert extract_gold("#### 1\nfix: #### 2") == "2"


def test_extract_gold_errors():
    with pytest.raises(ValueError, match="no '####'"):
        extract_gold("the answer is 72")
    with pytest.raises(ValueError, match="no number after the last '####'"):
        extract_gold("#### 72 then #### none")


# ---------------------------------------------------------------------------------------------
# score_response
# ---------------------------------------------------------------------------------------------


def test_score_correct_strict():
    r = score_response("3 + 4 = 7\n#### 7", "7")
    assert r == RewardResult(score=1.0, formatted=True, correct_strict=True, correct_flexible=True)


def test_score_wrong_but_formatted():
    r = score_response("#### 8", "7", format_score=0.1)
    assert r == RewardResult(score=0.1, formatted=True, correct_strict=False, correct_flexible=False)


def test_score_unformatted_correct_flexible():
    r = score_response("The answer is 7.", "7", format_score=0.1)
    assert r == RewardResult(score=0.0, formatted=False, correct_strict=False, correct_flexible=True)
    r = score_response("The answer is 7.", "7", method="flexible", correct_score=2.0)
    assert r.score == 2.0 and r.correct_flexible and not r.formatted


def test_score_flexible_method_formatted_but_wrong_last_number():
    r = score_response("#### 7\nCheck: 7 - 2 = 5", "7", method="flexible", format_score=0.2)
    assert r.correct_strict and not r.correct_flexible
    assert r.score == 0.2


def test_score_normalizes_ground_truth():
    assert score_response("#### $1,080.00", "1,080").score == 1.0
    assert score_response("#### 1080", " 1080 ").correct_strict


def test_score_no_number():
    r = score_response("I cannot solve this.", "7", format_score=0.5)
    assert r == RewardResult(score=0.0, formatted=False, correct_strict=False, correct_flexible=False)


def test_score_unknown_method():
    with pytest.raises(ValueError, match="unknown extraction method"):
        score_response("#### 1", "1", method="exact")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# load_custom_reward
# ---------------------------------------------------------------------------------------------


def test_load_custom_reward_from_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text(
        "def reward(response, ground_truth, response_ids):\n"
        "    return float(len(response_ids)) + (1.0 if ground_truth in response else 0.0)\n"
        "NOT_CALLABLE = 3\n"
    )
    fn = load_custom_reward(f"{f}:reward")
    assert fn(response="#### 7", ground_truth="7", response_ids=[1, 2]) == 3.0
    with pytest.raises(ValueError, match="not a callable") as ei:
        load_custom_reward(f"{f}:NOT_CALLABLE")
    assert str(f) in str(ei.value)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_custom_reward(f"{f}:missing")


def test_load_custom_reward_from_module(tmp_path, monkeypatch):
    (tmp_path / "rlctl_test_rewardmod.py").write_text("def r(**kw):\n    return 0.5\n")
    (tmp_path / "rlctl_test_broken.py").write_text("import rlctl_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_custom_reward("rlctl_test_rewardmod:r")(response="", ground_truth="", response_ids=[]) == 0.5
    with pytest.raises(ValueError, match="importing 'rlctl_test_broken' failed"):
        load_custom_reward("rlctl_test_broken:r")
    # stdlib module, callable attribute
    assert load_custom_reward("os.path:join") is __import__("os").path.join


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("no_colon_here", "bad custom reward spec 'no_colon_here'"),
        (":fn", "bad custom reward spec ':fn'"),
        ("mod:", "bad custom reward spec 'mod:'"),
        ("mod:not-a-name", "not a valid function name"),
        ("rlctl_no_such_module_xyz:fn", "module 'rlctl_no_such_module_xyz' not found"),
        ("/nonexistent/dir/reward.py:fn", "file '/nonexistent/dir/reward.py' not found"),
        ("os:no_such_attr", "'os' has no attribute 'no_such_attr'"),
        ("os:sep", "not a callable"),
    ],
)
def test_load_custom_reward_errors(spec, fragment):
    with pytest.raises(ValueError) as ei:
        load_custom_reward(spec)
    assert fragment in str(ei.value)
    assert repr(spec) in str(ei.value)


def test_load_custom_reward_file_with_syntax_error(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def oops(:\n")
    with pytest.raises(ValueError, match="SyntaxError"):
        load_custom_reward(f"{f}:oops")


# ---------------------------------------------------------------------------------------------
# prepare_gsm8k / read_prompts
# ---------------------------------------------------------------------------------------------


def write_source(dir_: Path, train: list[dict], test: list[dict]) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (dir_ / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dir_


TRAIN = [
    {"question": "Q1: 1+1?", "answer": "1+1=2\n#### 2"},
    {"question": "Q2: how much?", "answer": "It is $1,080.\n#### 1,080"},
    {"question": "Q3: negative?", "answer": "#### -4"},
]
TEST = [{"question": "T1?", "answer": "x\n#### 18"}]


def test_prepare_small(tmp_path):
    src = write_source(tmp_path / "src", TRAIN, TEST)
    out = tmp_path / "out"
    assert prepare_gsm8k(out, src) == {"train": 3, "validation": 1}
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet", "validation.parquet"]
    rows = read_prompts([str(out / "train.parquet")])
    assert rows[1] == {
        "prompt": [{"role": "user", "content": "Q2: how much?" + PROMPT_SUFFIX}],
        "answer": "1080",
        "data_source": "openai/gsm8k",
        "env_class": "gsm8k",
        "split": "train",
        "index": 1,
        "raw_answer": "It is $1,080.\n#### 1,080",
    }
    assert [r["answer"] for r in rows] == ["2", "1080", "-4"]
    val = read_prompts([out / "validation.parquet"])
    assert val[0]["split"] == "test" and val[0]["index"] == 0 and val[0]["answer"] == "18"
    # several files are concatenated in order
    both = read_prompts([str(out / "train.parquet"), str(out / "validation.parquet")])
    assert [r["split"] for r in both] == ["train"] * 3 + ["test"]


def test_prepare_schema(tmp_path):
    import pyarrow.parquet as pq

    src = write_source(tmp_path / "src", TRAIN, TEST)
    prepare_gsm8k(tmp_path / "out", src)
    schema = pq.read_schema(tmp_path / "out" / "train.parquet")
    assert schema.names == ["prompt", "answer", "data_source", "env_class", "split", "index", "raw_answer"]
    assert str(schema.field("index").type) == "int64"
    assert str(schema.field("prompt").type) == "list<element: struct<role: string, content: string>>"


def test_prepare_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    src = write_source(tmp_path / "src", TRAIN, TEST)
    assert gsm8k.DEFAULT_OUTPUT_DIR == "~/data/gsm8k"
    prepare_gsm8k(gsm8k.DEFAULT_OUTPUT_DIR, "~/src")
    assert (tmp_path / "data" / "gsm8k" / "train.parquet").is_file()


def test_prepare_overwrites_and_is_byte_identical(tmp_path):
    src = write_source(tmp_path / "src", TRAIN, TEST)
    a, b = tmp_path / "a", tmp_path / "b"
    prepare_gsm8k(a, src)
    prepare_gsm8k(b, src)
    first = {p.name: sha256(p) for p in a.iterdir()}
    assert first == {p.name: sha256(p) for p in b.iterdir()}
    prepare_gsm8k(a, src)  # re-run in place
    assert first == {p.name: sha256(p) for p in a.iterdir()}


def test_duplicates_kept_and_logged(tmp_path, caplog):
    src = write_source(tmp_path / "src", TRAIN + [TRAIN[0]], [TEST[0], {"question": "Q1: 1+1?", "answer": "#### 2"}])
    with caplog.at_level("WARNING", logger="rlctl.gsm8k"):
        assert prepare_gsm8k(tmp_path / "out", src) == {"train": 4, "validation": 2}
    text = caplog.text
    assert "train split: 1 duplicated question(s) kept" in text
    assert "1 test question(s) also appear in the train split" in text


@pytest.fixture
def hub_up(monkeypatch):
    """The hub probe answers (the tests fake ``datasets`` itself; CI has no network)."""
    monkeypatch.setattr(gsm8k, "_hub_unreachable", lambda: None)


def test_unreachable_hub_fails_at_once_without_load_dataset(tmp_path, monkeypatch):
    import types

    import huggingface_hub

    def dataset_info(self, repo_id, timeout=None):
        assert (repo_id, timeout) == ("openai/gsm8k", 10)
        raise OSError("[Errno -2] Name or service not known")

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: pytest.fail("load_dataset called although the hub is unreachable")
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(gsm8k.DownloadError) as ei:
        prepare_gsm8k(tmp_path / "out")
    assert str(ei.value) == (
        "could not reach the Hugging Face hub to download openai/gsm8k (OSError: [Errno -2] Name or service not "
        "known); pass --source-dir DIR with GSM8K train.jsonl/test.jsonl to prepare the data offline (or set "
        "HF_HUB_OFFLINE=1 to use a copy in the datasets cache)")
    assert not (tmp_path / "out").exists()
    # a copy from an earlier download: load_dataset is called (it falls back to the cache; here the fake answers)
    fake.load_dataset = lambda *a, **k: {"train": TRAIN, "test": TEST}
    (tmp_path / "hf" / "hub" / "datasets--openai--gsm8k").mkdir(parents=True)
    assert prepare_gsm8k(tmp_path / "out") == {"train": 3, "validation": 1}
    # offline mode: no probe at all
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda *a, **k: pytest.fail("probed although offline"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert prepare_gsm8k(tmp_path / "out2") == {"train": 3, "validation": 1}


def test_hub_failure_message(tmp_path, monkeypatch, hub_up):
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        assert args == ("openai/gsm8k", "main")
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataPrepError) as ei:
        prepare_gsm8k(tmp_path / "out")
    msg = str(ei.value)
    assert "could not reach the Hugging Face hub" in msg
    assert "--source-dir DIR" in msg and "train.jsonl" in msg and "test.jsonl" in msg
    assert not (tmp_path / "out").exists()


def test_hub_success_path(tmp_path, monkeypatch, hub_up):
    import types

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: {"train": TRAIN, "test": TEST}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert prepare_gsm8k(tmp_path / "out") == {"train": 3, "validation": 1}
    # same bytes as the local-source path
    src = write_source(tmp_path / "src", TRAIN, TEST)
    prepare_gsm8k(tmp_path / "local", src)
    for name in ("train.parquet", "validation.parquet"):
        assert sha256(tmp_path / "out" / name) == sha256(tmp_path / "local" / name)


def test_hub_bad_record_names_row(tmp_path, monkeypatch, hub_up):
    import types

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: {"train": TRAIN + [{"question": "q", "answer": "no marker"}], "test": TEST}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataPrepError, match=r"openai/gsm8k/train:4: answer has no '####'"):
        prepare_gsm8k(tmp_path / "out")


def test_read_prompts_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataPrepError, match="nope.parquet: prompt file not found"):
        read_prompts([str(missing)])
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "hi"}]]}), tmp_path / "noanswer.parquet")
    with pytest.raises(DataPrepError, match=r"noanswer.parquet: missing column\(s\) answer"):
        read_prompts([str(tmp_path / "noanswer.parquet")])
    pq.write_table(pa.table({"prompt": ["just text"], "answer": ["1"]}), tmp_path / "flat.parquet")
    with pytest.raises(DataPrepError, match="flat.parquet: row 0: 'prompt' must be"):
        read_prompts([str(tmp_path / "flat.parquet")])
    (tmp_path / "garbage.parquet").write_text("not parquet")
    with pytest.raises(DataPrepError, match="garbage.parquet: not a readable parquet file"):
        read_prompts([str(tmp_path / "garbage.parquet")])
    with pytest.raises(ValueError, match="no parquet files"):
        read_prompts([])


@needs_shared
def test_full_gsm8k_row_counts_and_rerun(tmp_path):
    out = tmp_path / "gsm8k"
    assert prepare_gsm8k(out, SHARED) == {"train": 7473, "validation": 1319}
    first = {p.name: sha256(p) for p in out.iterdir()}
    assert sorted(first) == ["train.parquet", "validation.parquet"]
    assert prepare_gsm8k(out, SHARED) == {"train": 7473, "validation": 1319}
    assert first == {p.name: sha256(p) for p in out.iterdir()}

    train = read_prompts([str(out / "train.parquet")])
    val = read_prompts([str(out / "validation.parquet")])
    assert len(train) == 7473 and len(val) == 1319
    assert train[0]["answer"] == "72" and train[0]["index"] == 0
    assert train[0]["prompt"][0]["content"].startswith("Natalia sold clips")
    assert train[0]["prompt"][0]["content"].endswith(PROMPT_SUFFIX)
    assert [r["index"] for r in val] == list(range(1319))
    # every gold answer is a canonical integer, and the reference solution scores 1.0
    for row in train + val:
        assert normalize_number(row["answer"]) == row["answer"]
        assert "," not in row["answer"]
        assert score_response(row["raw_answer"], row["answer"]).score == 1.0


@needs_shared
def test_gsm8k_has_no_duplicate_questions():
    # documents the decision in prepare_gsm8k: duplicates are kept but GSM8K has none
    for name in ("train", "test"):
        qs = [json.loads(line)["question"] for line in (SHARED / f"{name}.jsonl").open()]
        assert len(qs) == len(set(qs))


# ---------------------------------------------------------------------------------------------
# Bundled sample
# ---------------------------------------------------------------------------------------------


def test_sample_rows():
    train = read_prompts([str(SAMPLE_DIR / "train.parquet")])
    val = read_prompts([str(SAMPLE_DIR / "validation.parquet")])
    assert len(train) == 64
    assert len(val) == 32
    assert [r["index"] for r in train] == list(range(64))
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in val} == {"test"}
    assert train[0]["answer"] == "72"
    for row in train + val:
        assert score_response(row["raw_answer"], row["answer"]).score == 1.0


def test_sample_notice():
    notice = (SAMPLE_DIR / "NOTICE").read_text()
    assert "Copyright (c) 2021 OpenAI" in notice
    assert "MIT License" in notice
    assert "Permission is hereby granted, free of charge" in notice


@needs_shared
def test_sample_matches_regeneration(tmp_path):
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_gsm8k_sample
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert make_gsm8k_sample.make_sample(SHARED, tmp_path) == {"train": 64, "validation": 32}
    for name in ("train.parquet", "validation.parquet"):
        # compare contents, not bytes, so a pyarrow upgrade does not break this test
        assert pq.read_table(tmp_path / name).equals(pq.read_table(SAMPLE_DIR / name)), name
    assert (tmp_path / "NOTICE").read_text() == (SAMPLE_DIR / "NOTICE").read_text()


# ---------------------------------------------------------------------------------------------
# Import cost
# ---------------------------------------------------------------------------------------------


def test_import_is_light():
    code = textwrap.dedent(
        """
        import sys
        import rlctl.gsm8k
        heavy = [m for m in ("torch", "ray", "sglang", "datasets", "pyarrow", "transformers") if m in sys.modules]
        print(",".join(heavy))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == ""


def test_flexible_score_shapes_strict_reward():
    from rlctl.gsm8k import score_response

    kw = dict(method="strict", correct_score=1.0, format_score=0.1, flexible_score=0.5)
    assert score_response("so the answer is \\boxed{18}", "18", **kw).score == 0.5  # right number, no ####
    assert score_response("18 eggs.\n#### 18", "18", **kw).score == 1.0
    assert score_response("#### 17", "18", **kw).score == 0.1
    assert score_response("no idea", "18", **kw).score == 0.0
    # without flexible_score the right-but-unformatted answer earns nothing under strict
    assert score_response("\\boxed{18}", "18", method="strict").score == 0.0


def test_bom_is_ignored_and_a_file_as_source_dir_is_named(tmp_path):
    src = write_source(tmp_path / "src", TRAIN, TEST)
    prepare_gsm8k(tmp_path / "plain", src)
    (src / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + (src / "train.jsonl").read_bytes())  # a BOM
    prepare_gsm8k(tmp_path / "bom", src)
    for name in ("train.parquet", "validation.parquet"):
        assert sha256(tmp_path / "bom" / name) == sha256(tmp_path / "plain" / name)
    with pytest.raises(DataPrepError, match=r"train.jsonl: is a file; --source-dir takes the folder"):
        prepare_gsm8k(tmp_path / "x", src / "train.jsonl")
