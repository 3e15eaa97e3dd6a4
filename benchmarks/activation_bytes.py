"""Bytes a decoder layer saves for backward, per token: the measured side of rlctl.memory_plan's activation
coefficients (``act_values_per_token_layer_*``, ``act_fp32_values_per_token_layer_h``).

Runs one decoder layer of a random model of a ``benchmarks/random_model.py`` shape (2 layers built, on the CPU,
bf16, sdpa) under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages it saves,
parameters left out, once with a padding mask (what rlctl's trainer passes: transformers' sdpa path then
repeats k / v to every head) and once causal only. The tensors autograd saves are the same on a GPU; only the
attention kernel's own extras (its log-sum-exp, a few bytes per head) differ. Prints one JSON line.

    python benchmarks/activation_bytes.py --like qwen2.5-0.5b [--length 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402,F401  (puts the checkout's rlctl first on sys.path)


def saved_bytes_per_token(like: str, batch: int = 2, length: int = 64, masked: bool = True) -> dict:
    """Saved-for-backward bytes per token of decoder layer 0 of a random ``like``-shaped model.

    Args:
        like: a key of ``random_model.SHAPES``.
        batch, length: the input is [batch, length] tokens (bytes scale with tokens; any length works).
        masked: pass a [batch, 1, length, length] causal boolean mask (rlctl's trainer path) instead of none.
    Returns:
        ``{"bytes_per_token": int, "storages_bytes_per_token": [int, ...]}`` (bf16 and fp32 storages together).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from random_model import SHAPES

    fields = dict(SHAPES[like], num_hidden_layers=2)
    cfg = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16)
    layer = model.model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    hidden = torch.randn(batch, length, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(length)[None].expand(batch, -1)
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril() if masked else None
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden, attention_mask=mask, position_embeddings=model.model.rotary_emb(hidden, pos), position_ids=pos)
    tokens = batch * length
    return {"bytes_per_token": sum(seen.values()) // tokens,
            "storages_bytes_per_token": sorted(v // tokens for v in seen.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", default="qwen2.5-0.5b")
    ap.add_argument("--length", type=int, default=64)
    a = ap.parse_args(argv)
    from rlctl import memory_plan as mp
    from random_model import SHAPES

    planned = mp.ModelShape.from_config_json(SHAPES[a.like]).activation_bytes_per_token_layer(2)  # bf16
    out = {"like": a.like, "planned_bytes_per_token_layer": planned,
           "masked": saved_bytes_per_token(a.like, length=a.length, masked=True),
           "causal": saved_bytes_per_token(a.like, length=a.length, masked=False)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
