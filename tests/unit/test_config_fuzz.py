"""Config fuzzing (hypothesis, fixed seed and example counts): random override sets, random YAML
documents and wrong types for known keys. Only ConfigError may escape load_config, every error line
names a key path (or the file / the override), and nothing heavy is imported."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlctl.config import LEAF_DEFAULTS, VLLM_GENERATOR_KEYS, VLLM_SAMPLING_KEYS, ConfigError, load_config

# RLCTL_FUZZ_EXAMPLES lowers the count (test_fuzz_in_fresh_interpreter_imports_nothing_heavy uses 40)
EXAMPLES = int(os.environ.get("RLCTL_FUZZ_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
HEAVY = ("torch", "ray", "sglang", "transformers", "vllm")
COUNTS: dict[str, int] = {}

LEAVES = sorted(LEAF_DEFAULTS)
EXTRA = [f"generator.{k}" for k in VLLM_GENERATOR_KEYS] + [
    f"generator.{sp}.{k}" for sp in ("sampling_params", "eval_sampling_params") for k in VLLM_SAMPLING_KEYS]
SECTIONS = sorted({p.rsplit(".", 1)[0] for p in LEAVES if "." in p})
# an error line starts with a key path (a.b.c[0]=..., a.b: ...), the file, "override '...'" or "--preset"
LINE_RE = re.compile(r"^([A-Za-z_][\w]*(\.[A-Za-z_]\w*)*(\[\d+\])?[=:]|override |preset |--preset|--backend|/|\(top level\))")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["sglang", "hf", "vllm", "fsdp", "fsdp2", "wandb", "k3", "none", "latest",
                                           "grpo", "cpu", "null", "~", "Qwen/Qwen2.5-1.5B-Instruct", "a.parquet"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)
keys = st.one_of(st.sampled_from(LEAVES + EXTRA + SECTIONS), st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,3}", fullmatch=True))
value_text = st.one_of(
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()),
    st.text(max_size=30),
)
override = st.one_of(st.tuples(keys, value_text).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=20))


def check(fn) -> None:
    before = set(sys.modules)
    try:
        loaded = fn()
        assert loaded.cfg.trainer.run_name
    except ConfigError as exc:
        assert exc.errors, "empty ConfigError"
        for line in exc.errors:
            assert LINE_RE.match(line), f"error line does not name a key or file: {line!r}"
    new_heavy = {m.split(".")[0] for m in set(sys.modules) - before} & set(HEAVY)
    assert not new_heavy, new_heavy


def count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@SETTINGS
@given(st.lists(override, max_size=6), st.sampled_from([None, "sglang", "hf", "vllm", "x"]),
       st.sampled_from([None, "gsm8k", "gsm8k-cpu", "ppo_base_config", "../x", "nope"]), st.booleans())
def test_fuzz_overrides(items, backend, preset, for_training):
    count("overrides")
    check(lambda: load_config(preset=preset, overrides=items, backend=backend, for_training=for_training))


def document(pairs) -> dict:
    """Nested mapping from (dotted key, value) pairs (later pairs win, like YAML merging)."""
    out: dict = {}
    for k, v in pairs:
        d = out
        parts = k.split(".")
        for part in parts[:-1]:
            d = d.setdefault(part, {}) if isinstance(d.get(part, {}), dict) else d
        d[parts[-1]] = v
    return out


documents = st.one_of(st.lists(st.tuples(keys, values), max_size=6).map(document), values)


@SETTINGS
@given(st.one_of(documents.map(lambda d: yaml.safe_dump(d)), st.text(max_size=200),
                 st.sampled_from(["!!python/object/apply:os.system ['true']\n", "a: [1, 2\n", "- 1\n", "{{{", "defaults: [nope]\n",
                                  "defaults: [../etc]\n", "defaults: 5\n", "trainer: 5\n", "? [1, 2]\n: 3\n"])))
def test_fuzz_yaml_documents(tmp_path_factory, text):
    count("yaml documents")
    f = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    f.write_bytes(text.encode("utf-8", "replace"))
    check(lambda: load_config(config_file=f))


@SETTINGS
@given(st.sampled_from(LEAVES), values)
def test_fuzz_wrong_types_for_known_keys(path, value):
    count("typed values")

    def run():
        return load_config(overrides=[f"{path}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])

    try:
        check(run)
    except ConfigError:
        pytest.fail("ConfigError escaped check()")


FRESH = r"""
import sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_config_fuzz as m

class Factory:  # stands in for pytest's tmp_path_factory: folders under the test's tmp_path (argv[2])
    def mktemp(self, name):
        return Path(tempfile.mkdtemp(prefix=name, dir=sys.argv[2]))

m.test_fuzz_overrides()
m.test_fuzz_yaml_documents(Factory())
m.test_fuzz_wrong_types_for_known_keys()
heavy = sorted({n.split(".")[0] for n in sys.modules} & set(m.HEAVY))
print("examples", sum(m.COUNTS.values()), "heavy", heavy)
sys.exit(1 if heavy else 0)
"""


def test_fuzz_in_fresh_interpreter_imports_nothing_heavy(tmp_path):
    """In this pytest process torch may already be imported by another test module, which would make
    check()'s per-call import test vacuous; a fresh interpreter proves nothing heavy gets imported.
    Its YAML files go under tmp_path (pytest prunes it), not loose /tmp/fuzz* folders."""
    r = subprocess.run([sys.executable, "-c", FRESH, str(Path(__file__).parent), str(tmp_path)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "RLCTL_FUZZ_EXAMPLES": "40"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert any(p.name.startswith("fuzz") for p in tmp_path.iterdir())  # the documents were written here
    assert "heavy []" in r.stdout, r.stdout
    COUNTS["fresh interpreter"] = int(r.stdout.split("examples", 1)[1].split()[0])


def test_zz_report_counts(capsys):
    with capsys.disabled():
        total = sum(COUNTS.values())
        print(f"\n[config fuzz] examples run: {COUNTS} (total {total})")
    assert all(n > 0 for n in COUNTS.values())
