"""A random-weight model folder of a known architecture, for the seed's setup on a machine without the hub.

The seed's default model is Qwen2.5-1.5B-Instruct; the GPU machine cannot download it, so the trainer-speed
issue measures "the seed setup" on a model of the same shape with random weights and the kit's Qwen
tokenizer (same vocabulary: 151,936 rows). Every response then runs to ``max_new_tokens``, which is the
worst case for the step (and what the issue's 73.0 s baseline measured).

    python3 benchmarks/random_model.py --like qwen2.5-1.5b --tokenizer-from /tmp/models/qwen2.5-coder-0.5b-instruct \\
        --out /tmp/models/qwen2.5-1.5b-random

Writes config.json, bf16 model.safetensors (about 3.1 GB for 1.5B), generation_config.json and the tokenizer
files of ``--tokenizer-from``; prints the parameter count. Test: ``pytest tests/unit/test_random_model.py``
(a tiny shape on CPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

#: Fields every published Qwen2.5 ``config.json`` below shares.
_QWEN25 = dict(model_type="qwen2", max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
               bos_token_id=151643, eos_token_id=151645)

#: Architectures by name: the fields of their published ``config.json`` that fix the shape.
SHAPES: dict[str, dict] = {
    # Qwen/Qwen2.5-0.5B-Instruct config.json (the Coder variant has the same shape)
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # Qwen/Qwen2.5-1.5B-Instruct config.json
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # Qwen/Qwen2.5-7B-Instruct config.json
    "qwen2.5-7b": dict(_QWEN25, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # a tiny Qwen2 for tests (same code path, seconds on a CPU)
    "tiny-qwen2": dict(_QWEN25, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def build_random_model(like: str, out: Path, tokenizer_from: Path | None, seed: int = 0) -> int:
    """Write a random bf16 model of architecture ``like`` (a key of :data:`SHAPES`) into ``out``.

    Args:
        like: architecture name.
        out: output folder (created; files written by ``save_pretrained``, the tokenizer files copied).
        tokenizer_from: a model folder whose tokenizer files are copied (its vocabulary must fit the shape's
            ``vocab_size``), or None for no tokenizer.
        seed: torch seed of the initialization.
    Returns:
        The parameter count.
    Raises:
        KeyError: ``like`` is not in :data:`SHAPES` (the message lists them).
        FileNotFoundError: ``tokenizer_from`` holds no ``tokenizer.json`` / ``tokenizer_config.json``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if like not in SHAPES:
        raise KeyError(f"unknown --like {like!r}; known: {', '.join(SHAPES)}")
    fields = dict(SHAPES[like])
    model_type = fields.pop("model_type")
    if tokenizer_from is not None and not any((tokenizer_from / f).is_file() for f in TOKENIZER_FILES[:2]):
        raise FileNotFoundError(f"--tokenizer-from {tokenizer_from}: no tokenizer.json or tokenizer_config.json there")
    cfg = AutoConfig.for_model(model_type, torch_dtype="bfloat16", **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=fields["bos_token_id"], eos_token_id=fields["eos_token_id"]).save_pretrained(out)
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer_from / f).is_file():
                shutil.copy2(tokenizer_from / f, out / f)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--like", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokenizer-from", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    n = build_random_model(a.like, a.out, a.tokenizer_from, a.seed)
    print(f"random_model: {a.like} with {n:,} parameters -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
