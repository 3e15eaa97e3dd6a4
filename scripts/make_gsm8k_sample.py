#!/usr/bin/env python
"""Regenerate the bundled GSM8K sample in rlctl/data/gsm8k_sample/.

train.parquet = first 64 rows of GSM8K train, validation.parquet = first 32 rows of GSM8K test,
both written by rlctl.gsm8k.prepare_gsm8k (so the sample has exactly the columns and
normalization of a full `rlctl data gsm8k` run). Also writes the GSM8K MIT NOTICE.

Usage: python scripts/make_gsm8k_sample.py [--source-dir ../shared/data/gsm8k] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlctl.gsm8k import SAMPLE_DIR, prepare_gsm8k  # noqa: E402

TRAIN_ROWS = 64
TEST_ROWS = 32

NOTICE = """\
This folder holds a small sample of GSM8K (Grade School Math 8K), https://github.com/openai/grade-school-math:
train.parquet = the first 64 problems of the GSM8K train split, validation.parquet = the first
32 problems of the GSM8K test split, reformatted by rlctl (scripts/make_gsm8k_sample.py).

GSM8K is distributed under the MIT License:

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def head_lines(src: Path, dst: Path, n: int) -> None:
    """Copy the first ``n`` lines of ``src`` to ``dst`` byte for byte."""
    with open(src, "rb") as f:
        lines = [f.readline() for _ in range(n)]
    if len(lines[-1]) == 0:
        raise SystemExit(f"{src}: fewer than {n} lines")
    dst.write_bytes(b"".join(lines))


def make_sample(source_dir: Path, output_dir: Path) -> dict[str, int]:
    """Write the sample (train/validation parquet + NOTICE) into ``output_dir``; return row counts."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        head_lines(source_dir / "train.jsonl", tmp_dir / "train.jsonl", TRAIN_ROWS)
        head_lines(source_dir / "test.jsonl", tmp_dir / "test.jsonl", TEST_ROWS)
        counts = prepare_gsm8k(output_dir, source_dir=tmp_dir)
    (Path(output_dir) / "NOTICE").write_text(NOTICE, encoding="utf-8")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-dir", type=Path, default=REPO / ".." / "shared" / "data" / "gsm8k",
                        help="folder with the full GSM8K train.jsonl and test.jsonl")
    parser.add_argument("--output-dir", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args()
    counts = make_sample(args.source_dir, args.output_dir)
    print(f"wrote {counts} to {args.output_dir}")


if __name__ == "__main__":
    main()
