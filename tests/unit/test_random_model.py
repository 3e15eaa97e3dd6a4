"""benchmarks/random_model.py: the random model folder loads with transformers and has the stated shape."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("random_model", ROOT / "benchmarks" / "random_model.py")
random_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(random_model)


def test_tiny_qwen2_folder_loads_with_its_shape_and_the_copied_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlctl.testing import build_tiny_llama

    tok_src = build_tiny_llama(tmp_path / "tok")  # any folder with tokenizer files
    out = tmp_path / "m"
    n = random_model.build_random_model("tiny-qwen2", out, tok_src)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == ("qwen2", 64, 2, 2)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    # embeddings 512*64 (tied) + 2 layers * (q 64*64+64, k 64*32+32, v 64*32+32, o 64*64, mlp 3*64*128, 2 norms 64) + norm 64
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert n == 512 * 64 + 2 * layer + 64
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == n


def test_unknown_shape_and_missing_tokenizer_are_named(tmp_path):
    with pytest.raises(KeyError, match="unknown --like 'qwen9'; known: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, tiny-qwen2"):
        random_model.build_random_model("qwen9", tmp_path / "m", None)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer_config.json there"):
        random_model.build_random_model("tiny-qwen2", tmp_path / "m", tmp_path)
