"""rlctl.memory_plan: parameter counts from config.json, the plan's line items and phases (hand-computed),
the fit check and its suggestions (the issue's Qwen2.5-1.5B + gsm8k example), config.json lookup,
nvidia-smi parsing, rendering, and that none of it imports torch/ray/sglang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rlctl import memory_plan as mp
from rlctl.config import load_config

GiB = 1 << 30
MiB = 1 << 20
CTX = GiB // 2  # COEFFICIENTS["cuda_context_bytes"]

# Real config.json values (Hugging Face hub, the models' config.json).
QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True}
QWEN25_15B = {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True}
SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
                "attention_bias": False, "head_dim": 64}


# ------------------------------------------------------------------------------------ parameter counts

def test_qwen25_05b_parameter_count():
    # per layer: q 896*896 + 896 bias = 803,712; k and v 896*128 + 128 = 114,816 each; o 896*896 = 802,816
    #   -> attention 1,836,160; MLP 3*896*4864 = 13,074,432; norms 2*896 = 1,792 -> 14,912,384
    # 24 layers = 357,897,216; embedding 151936*896 = 136,134,656 (tied: no LM head); final norm 896
    s = mp.ModelShape.from_config_json(QWEN25_05B)
    assert (s.head_dim, s.kv_dim, s.attention_bias) == (64, 128, True)
    assert s.block_parameters == 14_912_384
    assert s.num_parameters == 357_897_216 + 136_134_656 + 896 == 494_032_768


def test_qwen25_15b_parameter_count():
    # per layer: q 1536*1536 + 1536 = 2,360,832; k, v 1536*256 + 256 = 393,472 each; o 2,359,296
    #   -> 5,507,072; MLP 3*1536*8960 = 41,287,680; norms 3,072 -> 46,797,824; x 28 = 1,310,339,072
    # embedding 151936*1536 = 233,373,696; final norm 1536
    s = mp.ModelShape.from_config_json(QWEN25_15B)
    assert s.block_parameters == 46_797_824
    assert s.num_parameters == 1_310_339_072 + 233_373_696 + 1536 == 1_543_714_304


def test_smollm2_135m_parameter_count(tmp_path):
    # no attention bias (llama): q 576*576 = 331,776; k, v 576*192 = 110,592 each; o 331,776 -> 884,736
    # MLP 3*576*1536 = 2,654,208; norms 1,152 -> 3,540,096; x 30 = 106,202,880
    # embedding 49152*576 = 28,311,552; final norm 576
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    s = mp.ModelShape.from_config_json(tmp_path)  # a folder works as well as the file or a dict
    assert s.num_parameters == 106_202_880 + 28_311_552 + 576 == 134_515_008
    assert s.source == str(tmp_path / "config.json")


def test_untied_embeddings_add_the_lm_head():
    s = mp.ModelShape.from_config_json({**SMOLLM2_135M, "tie_word_embeddings": False})
    assert s.num_parameters == 134_515_008 + 28_311_552


def test_shape_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"config.json: vocab_size must be a positive integer, got None"):
        mp.ModelShape.from_config_json({k: v for k, v in QWEN25_05B.items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="num_local_experts=8: mixture-of-experts models are not estimated"):
        mp.ModelShape.from_config_json({**QWEN25_05B, "num_local_experts": 8})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        mp.ModelShape.from_config_json(tmp_path / "config.json")


# ---------------------------------------------------------------------------------- plan line items

TOY = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2,
       "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 16, "vocab_size": 32, "tie_word_embeddings": True}
TOY_OVERRIDES = ["trainer.placement.policy_num_gpus_per_node=2", "generator.num_inference_engines=2",
                 "trainer.micro_train_batch_size_per_gpu=2", "trainer.micro_forward_batch_size_per_gpu=4",
                 "trainer.max_prompt_length=16", "generator.sampling_params.max_new_tokens=8",
                 "trainer.gradient_checkpointing=false", "generator.gpu_memory_utilization=0.5",
                 "generator.weight_sync_bucket_mb=1"]


def _cfg(overrides, preset="gsm8k"):
    return load_config(preset=preset, overrides=overrides, backend="sglang").cfg


def test_toy_plan_line_items_and_phases():
    # Toy model: h=8, 3 layers, 2 heads x 4, 1 kv head x 4 (kv=4), i=16, V=32, tied, no bias.
    #   block = q 64 + k 32 + v 32 + o 64 + MLP 3*8*16=384 + norms 16 = 592; root = 32*8 + 8 = 264
    #   P = 3*592 + 264 = 2040
    # gsm8k (colocated, KL on, bf16: dt=2) on 2 GPUs (N=2), micro 2 / forward 4, seq = 16 + 8 = 24 tokens, T=8.
    #   master 4*2040/2 = 4080; grads 4080; AdamW 8*2040/2 = 8160; reference (bf16) 2*2040/2 = 2040
    #   compute copies 2 B x (2 blocks x 592 + 264) = 2896
    #   per token per layer: 2 B x (8*8 + 0*4 + 4*16) + 4 B x 2*8 = 256 + 64 = 320
    #   train activations (no checkpointing): 2*24 tokens x 3 layers x 320 = 46,080
    #   train log-prob set: min(2 x 8, 1024) = 16 positions x 32 x 10 B + fp32 head grad 4 x 32 x 8 = 5,120 + 1,024
    #   = 6,144; forward activations 4*24 x 1 layer x 320 = 30,720
    #   forward log-prob set min(4 x 8, 1024) = 32 x 32 x 6 B = 6,144; weight-sync buckets 2 x 1 MiB
    #   allocator slack 0.26 x (46,080 + 6,144) = 13,578 (train), 0.26 x (30,720 + 6,144) = 9,584 (forward)
    # engine on a 2 GiB GPU: weights 2 B x 2040 = 4080; fraction 0.5 x 2 GiB = 1 GiB = weights + KV + context
    #   -> KV = 1 GiB - 4080 - 0.5 GiB; outside the fraction 2 GiB (CUDA graphs on); asleep 2.5 GiB
    s = mp.ModelShape.from_config_json(TOY)
    assert (s.block_parameters, s.root_parameters, s.num_parameters) == (592, 264, 2040)
    p = mp.plan(_cfg(TOY_OVERRIDES), s, 2 * GiB)
    got = {k: it.bytes for k, it in ((it.key, it) for it in p.processes["trainer"])}
    assert got == {"cuda_context": CTX, "master_weights": 4080, "gradients": 4080, "adamw_state": 8160,
                   "reference_weights": 2040, "compute_copies": 2896, "train_activations": 46_080,
                   "train_logits": 6_144, "forward_activations": 30_720, "forward_logits": 6_144,
                   "train_slack": 13_578, "forward_slack": 9_584,
                   "weight_sync_buckets": 2 * MiB, "kept_after_offload": GiB}
    eng = {it.key: it.bytes for it in p.processes["engine"]}
    assert eng == {"cuda_context": CTX, "weights": 4080, "kv_cache": GiB - 4080 - CTX,
                   "outside_fraction": 2 * GiB, "kept_asleep": int(2.5 * GiB)}
    assert (p.layout, p.num_gpus) == ("colocated", 2)
    phases = {ph.name: ph.bytes for ph in p.phases}
    # train: trainer context + 4080 + 8160 + 4080 + 2040 + 2896 + 46,080 + 6,144 + 13,578 = 87,058 (+ context)
    #        + engine context + 2.5 GiB asleep
    assert phases["train"] == 87_058 + 2 * CTX + int(2.5 * GiB)
    # log-probs: no gradients: 4080 + 8160 + 2040 + 2896 + 30,720 + 6,144 + 9,584 = 63,624
    assert phases["log-probs"] == 63_624 + 2 * CTX + int(2.5 * GiB)
    # weight sync: 4080 + 8160 + 2040 + 2 MiB buckets + engine weights 4080 + asleep
    assert phases["weight sync"] == 18_360 + 2 * MiB + 2 * CTX + int(2.5 * GiB)
    # rollout: the engine's 1 GiB fraction + 2 GiB outside + the trainer's context + 1 GiB kept
    assert phases["rollout"] == GiB + 2 * GiB + CTX + GiB
    assert p.peak.name == "rollout" and p.peak_bytes == 4.5 * GiB


def test_toy_plan_with_checkpointing_split_and_no_kl():
    # checkpointing: per token 3 layers x 1 x 8 x 2 B = 48 kept + 2 recomputed layers x 320 = 640 -> 688
    #   x 48 tokens = 33,024. Split placement: 2 policy GPUs + 2 engine GPUs; no offload line, no asleep.
    s = mp.ModelShape.from_config_json(TOY)
    ov = [o for o in TOY_OVERRIDES if not o.startswith("trainer.gradient_checkpointing")]
    p = mp.plan(_cfg([*ov, "trainer.placement.colocate_all=false", "trainer.algorithm.use_kl_loss=false"]), s, None)
    assert p.item("trainer", "train_activations").bytes == 33_024
    assert (p.layout, p.num_gpus) == ("split", 4)
    keys = [it.key for it in p.processes["trainer"]]
    assert "reference_weights" not in keys and "kept_after_offload" not in keys
    assert p.item("engine", "kv_cache").bytes is None  # GPU size unknown
    phases = {(ph.name, ph.gpu): ph.bytes for ph in p.phases}
    # train on a policy GPU: context + 4080 + 8160 + 4080 grads + 2896 + 33,024 + 6,144
    #   + allocator slack 0.26 x (33,024 + 6,144) = 10,183
    assert phases[("train", "policy GPU")] == CTX + 58_384 + 10_183
    assert phases[("rollout", "engine GPU")] is None and p.peak is None


def test_toy_plan_with_a_token_budget_sizes_micro_batches_by_it():
    # trainer.max_tokens_per_microbatch=60 (micro sizes 2 / 4 then have no effect): every micro-batch holds at most
    #   max(60, 24) = 60 real tokens -> train activations 60 x 3 layers x 320 = 57,600; forward 60 x 1 x 320 = 19,200;
    #   log-prob sets min(60, 1024) = 60 positions: train 60 x 32 x 10 + 1,024 = 20,224, forward 60 x 32 x 6 = 11,520
    #   slack 0.26 x (57,600 + 20,224) = 20,234 (train), 0.26 x (19,200 + 11,520) = 7,987 (forward)
    s = mp.ModelShape.from_config_json(TOY)
    p = mp.plan(_cfg([*TOY_OVERRIDES, "trainer.max_tokens_per_microbatch=60"]), s, 2 * GiB)
    got = {it.key: it.bytes for it in p.processes["trainer"]}
    assert (got["train_activations"], got["forward_activations"]) == (57_600, 19_200)
    assert (got["train_logits"], got["forward_logits"]) == (20_224, 11_520)
    assert (got["train_slack"], got["forward_slack"]) == (20_234, 7_987)
    assert "max(60, 24) tokens (trainer.max_tokens_per_microbatch)" in p.item("trainer", "train_activations").detail
    # a budget below one whole sequence still holds that sequence (it runs alone): max(10, 24) = 24 tokens
    p = mp.plan(_cfg([*TOY_OVERRIDES, "trainer.max_tokens_per_microbatch=10"]), s, 2 * GiB)
    assert p.item("trainer", "train_activations").bytes == 24 * 3 * 320
    # the fit check offers smaller budgets (never below one sequence), not micro-batch sizes that have no effect
    cands = [label for label, _ in mp._candidates({**mp.plan_inputs(_cfg([*TOY_OVERRIDES, "trainer.max_tokens_per_microbatch=200"])),
                                                    "trainer.max_tokens_per_microbatch": 200})]
    assert cands.count("trainer.max_tokens_per_microbatch") == 4  # 100, 50, 25 (>= 24) and one sequence, 24
    assert "trainer.micro_train_batch_size_per_gpu" not in cands


def test_toy_plan_with_tensor_parallel_engines():
    # 1 engine of TP 2 on the 2 GPUs (colocated): each TP rank holds half the weights, ceil(2 B x 2040 / 2) = 2040,
    # but the toy's ONE key/value head cannot be split: SGLang replicates it on both ranks, so each holds every
    # token's whole KV: 2 (k, v) x 3 layers x kv 4 x 2 B = 48 B; the KV pool is the 1 GiB fraction - 2040 - the
    # context = 536,868,872 B = ~11,184,768 tokens of 48 B
    s = mp.ModelShape.from_config_json(TOY)
    ov = [o for o in TOY_OVERRIDES if not o.startswith("generator.num_inference_engines")]
    tp2 = ["generator.num_inference_engines=1", "generator.inference_engine_tensor_parallel_size=2"]
    p = mp.plan(_cfg([*ov, *tp2]), s, 2 * GiB)
    assert p.item("engine", "weights").bytes == 2040 and p.item("engine", "weights").detail == "2 B x 2,040 params / TP 2"
    assert p.item("engine", "kv_cache").bytes == GiB - 2040 - CTX == 536_868_872
    assert "~11,184,768 tokens of 48 B" in p.item("engine", "kv_cache").detail
    # with 2 key/value heads each rank holds one of them: 2 x 3 layers x kv 8 x 2 B = 96 B / 2 ranks = 48 B
    s2 = mp.ModelShape.from_config_json({**TOY, "num_key_value_heads": 2})
    p2 = mp.plan(_cfg([*ov, *tp2]), s2, 2 * GiB)
    assert "tokens of 48 B" in p2.item("engine", "kv_cache").detail
    assert (p.layout, p.num_gpus) == ("colocated", 2)
    # split: the 2 policy GPUs + 1 engine x TP 2
    p = mp.plan(_cfg([*ov, *tp2, "trainer.placement.colocate_all=false"]), s, 2 * GiB)
    assert (p.layout, p.num_gpus) == ("split", 4)


# ------------------------------------------------------------------------------ the issue's example

@pytest.fixture
def qwen15_dir(tmp_path):
    d = tmp_path / "Qwen2.5-1.5B-Instruct"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], **QWEN25_15B}))
    return d


def test_issue_example_refused_at_24_gib_with_the_keys(qwen15_dir):
    cfg = load_config(preset="gsm8k", overrides=[f"trainer.policy.model.path={qwen15_dir}"], backend="sglang").cfg
    p, notes = mp.plan_for_config(cfg, mp.gpu_bytes_from_gb(24))
    assert notes == [] and p.shape.num_parameters == 1_543_714_304
    # 1 GPU: fp32 master + grads (4 B each), AdamW (8 B), bf16 reference (2 B) = 18 B x 1,543,714,304 = 25.9 GiB
    static = sum(p.item("trainer", k).bytes for k in ("master_weights", "gradients", "adamw_state", "reference_weights"))
    assert static == 18 * 1_543_714_304
    # train log-prob set: min(8 x 1024, 1024) positions x 151,936 x 10 B + fp32 head gradient 4 x 151,936 x 1536
    assert p.item("trainer", "train_logits").bytes == 1024 * 151936 * 10 + 4 * 151936 * 1536
    level, text = mp.check_fit(p, mp.gpu_bytes_from_gb(24))
    assert level == "error"
    assert "exceeds the GPU's 24.0 GiB by more than the estimate's 20% error" in text
    assert "(train, shared GPU)" in text
    assert "trainer.micro_train_batch_size_per_gpu=8 -> " in text
    assert "trainer.placement.policy_num_gpus_per_node=1 -> " in text and "generator.num_inference_engines=1 -> " in text
    assert "generator.sampling_params.max_new_tokens=1024 -> " in text
    assert mp.OVERRIDE_FLAG in text  # 2 GPUs alone fit now (no "together:" line needed)
    # the override turns it into a warning
    level, text = mp.check_fit(p, mp.gpu_bytes_from_gb(24), allow_over=True)
    assert level == "warning" and f"running anyway ({mp.OVERRIDE_FLAG})" in text


def test_issue_example_fits_at_141_gib_and_prints(qwen15_dir):
    from rich.console import Console

    cfg = load_config(preset="gsm8k", overrides=[f"trainer.policy.model.path={qwen15_dir}"], backend="sglang").cfg
    gpu = mp.gpu_bytes_from_gb(141)
    p, _ = mp.plan_for_config(cfg, gpu)
    assert mp.check_fit(p, gpu) is None
    # the peak is the rollout: 0.6 x 141 GiB + 2 GiB outside + trainer context 0.5 + kept 1 = 88.1 GiB
    assert p.peak.name == "rollout" and p.peak_bytes == int(0.6 * gpu) + int(3.5 * GiB)
    console = Console(record=True, width=200)
    mp.print_plan_tree(p, console)
    out = console.export_text()
    assert "memory plan (colocated, 1 GPU, GPU 141.0 GiB; estimate +-20%)" in out
    assert "rollout (shared GPU): 88.1 GiB <- peak" in out
    d = mp.plan_as_dict(p)
    assert json.loads(json.dumps(d)) == d  # plain data for yaml/json
    assert d["peak"]["phase"] == "rollout" and d["model"]["parameters"] == 1_543_714_304
    assert d["processes"]["trainer"]["adamw_state"]["bytes"] == 8 * 1_543_714_304


def test_warning_within_the_error_and_kv_cache_error(qwen15_dir):
    cfg = load_config(preset="gsm8k", overrides=[f"trainer.policy.model.path={qwen15_dir}"], backend="sglang").cfg
    p, _ = mp.plan_for_config(cfg, None)
    assert mp.check_fit(p, None) is None  # no GPU size: printed without a fit check
    train = next(ph.bytes for ph in p.phases if ph.name == "train")  # 53.1 GiB, the peak on a GPU this size
    level, text = mp.check_fit(p, int(train / 1.1))  # 10% over: within the 20% error
    assert level == "warning" and "is within the estimate's +-20%" in text
    level, text = mp.check_fit(p, int(train / 0.9))  # 10% under: still within the error
    assert level == "warning"
    # a fraction that cannot hold the weights and one sequence: an error naming the key, even if the peak fits
    cfg2 = load_config(preset="gsm8k", overrides=[f"trainer.policy.model.path={qwen15_dir}",
                                                   "generator.gpu_memory_utilization=0.02"], backend="sglang").cfg
    level, text = mp.check_fit(mp.plan(cfg2, p.shape, 141 * GiB), 141 * GiB)
    assert level == "error" and "generator.gpu_memory_utilization=0.02: the engine's 2.8 GiB" in text


def test_unknown_model_gives_no_plan_and_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config(preset="gsm8k", overrides=["trainer.policy.model.path=Nobody/no-such-model"], backend="sglang").cfg
    p, notes = mp.plan_for_config(cfg, 80 * GiB)
    assert p is None
    assert notes == ["memory plan: no config.json for trainer.policy.model.path=Nobody/no-such-model (not a local "
                     "folder and not in the Hugging Face cache); no plan. Download it (`hf download Nobody/no-such-model`, "
                     "or only its config.json for the plan: `hf download Nobody/no-such-model config.json`; older "
                     "huggingface_hub: `huggingface-cli download`) or point trainer.policy.model.path at a local folder "
                     "holding its config.json"]
    cfg = load_config(preset="gsm8k", overrides=[f"trainer.policy.model.path={tmp_path}/empty"], backend="sglang").cfg
    assert mp.plan_for_config(cfg, 80 * GiB) == (None, [
        f"memory plan: no config.json in the folder trainer.policy.model.path={tmp_path}/empty; no plan. Point "
        "trainer.policy.model.path at a local folder holding its config.json, or at a Hugging Face model name"])


# ------------------------------------------------------------------------------- config.json lookup

def test_find_config_json_local_and_hub_cache(tmp_path, monkeypatch):
    local = tmp_path / "m"
    local.mkdir()
    assert mp.find_config_json(str(local)) is None  # a folder without config.json
    (local / "config.json").write_text("{}")
    assert mp.find_config_json(str(local)) == local / "config.json"
    assert mp.find_config_json(str(local / "config.json")) == local / "config.json"

    hub = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-1.5B-Instruct"
    for rev in ("aaa", "bbb"):
        (hub / "snapshots" / rev).mkdir(parents=True)
        (hub / "snapshots" / rev / "config.json").write_text("{}")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("aaa\n")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert mp.find_config_json("Qwen/Qwen2.5-1.5B-Instruct") == hub / "snapshots" / "aaa" / "config.json"
    (hub / "refs" / "main").unlink()  # no ref: the newest snapshot
    os.utime(hub / "snapshots" / "aaa" / "config.json", (1, 1))
    assert mp.find_config_json("Qwen/Qwen2.5-1.5B-Instruct") == hub / "snapshots" / "bbb" / "config.json"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # HF_HUB_CACHE wins over HF_HOME
    assert mp.find_config_json("Qwen/Qwen2.5-1.5B-Instruct") is None
    assert mp.find_config_json("not-a-hub-name") is None


# ------------------------------------------------------------------------------------- GPU memory

def _fake_smi(tmp_path, body):
    exe = tmp_path / "bin" / "nvidia-smi"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    return str(exe.parent)


def test_local_gpu_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert mp.local_gpu_bytes() is None  # no nvidia-smi
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", _fake_smi(tmp_path, 'printf "0, GPU-a1, 143771\\n1, GPU-b2, 81559\\n"'))
    assert mp.local_gpu_bytes() == 81559 * MiB  # the smallest GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the plan checks only the GPU the run would see
    assert mp.local_gpu_bytes() == 143771 * MiB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert mp.local_gpu_bytes() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-5c1e0f2a")  # a MIG slice's size is not the GPU's: no fit check
    assert mp.local_gpu_bytes() is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", _fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed'; exit 9"))
    assert mp.local_gpu_bytes() is None
    monkeypatch.setenv("PATH", _fake_smi(tmp_path, "sleep 5"))
    assert mp.local_gpu_bytes(timeout_s=0.3) is None


def test_gpu_bytes_from_gb():
    assert mp.gpu_bytes_from_gb(24) == 24 * GiB
    with pytest.raises(ValueError, match="--gpu-memory-gb must be a positive number of GiB, got 0"):
        mp.gpu_bytes_from_gb(0)


def test_no_heavy_imports():
    code = textwrap.dedent("""
        import sys
        from rlctl import memory_plan as mp
        from rlctl.config import load_config
        cfg = load_config(preset="gsm8k", backend="sglang").cfg
        s = mp.ModelShape.from_config_json(%r)
        p = mp.plan(cfg, s, 24 << 30)
        mp.check_fit(p, 24 << 30); mp.plan_as_dict(p); mp.plan_tree(p); mp.local_gpu_bytes()
        print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray", "sglang", "transformers"}))
    """ % QWEN25_15B)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_check_config_refuses_at_24_gib_and_prints_the_plan_at_141(tmp_path):
    """The issue's example through the CLI: Qwen2.5-1.5B-Instruct (its config.json in a local folder), preset
    gsm8k (KL on), --gpu-memory-gb 24 is refused naming the keys; 141 passes and prints the plan."""
    from typer.testing import CliRunner

    from rlctl.cli import app

    model = tmp_path / "qwen15"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN25_15B))
    runner = CliRunner()
    args = ["check-config", "--backend", "sglang", "--preset", "gsm8k", f"trainer.policy.model.path={model}"]
    res = runner.invoke(app, [*args, "--gpu-memory-gb", "24"])
    assert res.exit_code == 2, res.output
    assert "rlctl: the GPU memory plan does not fit:" in res.stderr
    assert "exceeds the GPU's 24.0 GiB by more than the estimate's 20% error" in res.stderr
    assert "trainer.micro_train_batch_size_per_gpu=8 -> " in res.stderr and "--ignore-memory-plan" in res.stderr
    res = runner.invoke(app, [*args, "--gpu-memory-gb", "24", "--ignore-memory-plan"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "--gpu-memory-gb", "141"])
    assert res.exit_code == 0, res.output
    assert "note: memory plan: peak " in res.stderr and "fits the 141.0 GiB GPU" in res.stderr
    assert "<- peak" in res.stdout and "KV cache" in res.stdout
    res = runner.invoke(app, [*args, "--gpu-memory-gb", "141", "--memory-plan", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["peak"]["gib"] > 24


def test_explicit_gpu_size_without_a_plan_is_a_warning(tmp_path, monkeypatch):
    """--gpu-memory-gb N (or --memory-plan) with a hub model whose config.json is not local: a visible warning
    that the fit check was NOT done (exit 0), not a quiet note; --memory-plan in json/yaml exits 2."""
    from typer.testing import CliRunner

    from rlctl.cli import app

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    runner = CliRunner()
    args = ["check-config", "--backend", "sglang", "--preset", "gsm8k", "trainer.policy.model.path=Nobody/no-such-model"]
    res = runner.invoke(app, [*args, "--gpu-memory-gb", "24"])
    assert res.exit_code == 0, res.output
    assert ("warning: memory plan: the fit check against 24 GiB (--gpu-memory-gb) was NOT done: no config.json for "
            "trainer.policy.model.path=Nobody/no-such-model (not a local folder") in res.stderr
    assert "note: memory plan: no config.json" not in res.stderr
    res = runner.invoke(app, [*args, "--memory-plan"])
    assert res.exit_code == 0 and "warning: memory plan: --memory-plan made no plan: no config.json" in res.stderr
    res = runner.invoke(app, [*args, "--memory-plan", "--format", "json", "--gpu-memory-gb", "141"])
    assert res.exit_code == 2 and res.stdout == ""
    assert "rlctl: memory plan: the fit check against 141 GiB (--gpu-memory-gb) was NOT done: no config.json" in res.stderr
    res = runner.invoke(app, args)  # not asked for: a note
    assert res.exit_code == 0 and "note: memory plan: no config.json for trainer.policy.model.path=Nobody/no-such-model" in res.stderr
    assert "warning: memory plan" not in res.stderr


def test_activation_coefficients_match_what_a_qwen2_layer_saves():
    """The plan's bytes per token per layer are what autograd saves for a Qwen2.5-0.5B-shaped decoder layer with
    the trainer's padding mask (benchmarks/activation_bytes.py), up to rotary cos / sin and the log-sum-exp."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from activation_bytes import saved_bytes_per_token

    from random_model import SHAPES

    planned = mp.ModelShape.from_config_json(SHAPES["qwen2.5-0.5b"]).activation_bytes_per_token_layer(2)
    assert planned == 60_416  # 2 B x (8 x 896 + 0 x 128 + 4 x 4864) + 4 B x 2 x 896
    saved = saved_bytes_per_token("qwen2.5-0.5b", batch=2, length=32, masked=True)["bytes_per_token"]
    assert planned <= saved <= 1.02 * planned, saved


def test_plan_without_a_gpu_size_names_the_largest_known_phase(tmp_path, monkeypatch):
    """No local GPU and no --gpu-memory-gb: the colocated rollout phase (the engine's fraction of an unknown GPU) is
    unknown, so the note gives the largest known phase (train, 1.5B with gsm8k) instead of 'peak ?'."""
    from typer.testing import CliRunner

    from rlctl.cli import app

    monkeypatch.setattr(mp, "local_gpu_bytes", lambda timeout_s=3.0: None)
    model = tmp_path / "qwen15"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN25_15B))
    res = CliRunner().invoke(app, ["check-config", "--backend", "sglang", "--preset", "gsm8k",
                                   f"trainer.policy.model.path={model}"])
    assert res.exit_code == 0, res.output
    p = mp.plan(_cfg([f"trainer.policy.model.path={model}"]), mp.ModelShape.from_config_json(QWEN25_15B), None)
    train = next(ph for ph in p.phases if ph.name == "train")
    assert [ph.name for ph in p.phases if ph.bytes is None] == ["rollout"]
    assert max(ph.bytes for ph in p.phases if ph.bytes is not None) == train.bytes
    assert (f"note: memory plan: largest known phase train {mp.gib(train.bytes)} per GPU; rollout unknown (the "
            "engine's KV cache is generator.gpu_memory_utilization x the GPU); no GPU size to check it against "
            "(pass --gpu-memory-gb N)") in res.stderr
    assert "peak ?" not in res.stderr
