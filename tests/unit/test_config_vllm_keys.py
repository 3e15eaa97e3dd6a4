"""Every vLLM / SkyRL name rlctl does not use as-is: a precise translation, a "no effect" note, or an
error -- ONE parametrized table, which must cover VLLM_GENERATOR_KEYS and VLLM_SAMPLING_KEYS."""

from __future__ import annotations

import pytest

from rlctl.config import VLLM_GENERATOR_KEYS, VLLM_SAMPLING_KEYS, ConfigError, load_config

G, S, E = "generator.", "generator.sampling_params.", "generator.eval_sampling_params."

# (override, backend, outcome, expected): outcome "translate" -> expected = (key path, value) in the
# resolved config (and a note mentions the old name); "note" -> a note fragment; "error" -> an error fragment.
CASES = [
    # generator-level engine keys
    (G + "tensor_parallel_size=2", "sglang", "translate", (G + "inference_engine_tensor_parallel_size", 2)),
    (G + "enforce_eager=true", "sglang", "translate", (G + "sglang.disable_cuda_graph", True)),
    (G + "enforce_eager=true", "hf", "note", "has no effect: the hf backend has no CUDA graphs"),
    (G + "max_num_seqs=256", "sglang", "translate", (G + "sglang.max_running_requests", 256)),
    (G + "max_num_seqs=256", "hf", "note", "generator.hf.max_batch_size"),
    (G + "enable_prefix_caching=false", "sglang", "translate", (G + "sglang.disable_radix_cache", True)),
    (G + "enable_prefix_caching=true", "sglang", "translate", (G + "sglang.disable_radix_cache", False)),
    (G + "enable_prefix_caching=false", "hf", "note", "the hf backend has no prefix cache"),
    (G + "enable_chunked_prefill=false", "sglang", "note", "SGLang chunks long prefills by default"),
    (G + "max_num_batched_tokens=8192", "sglang", "note", "SGLang sizes its prefill chunks itself"),
    (G + "vllm_v1_disable_multiproc=true", "sglang", "note", "vLLM-only option"),
    (G + "weight_transfer_threshold_cuda_ipc_GB=1.0", "sglang", "translate", (G + "weight_sync_bucket_mb", 1024)),
    (G + "remote_inference_engine_urls=['127.0.0.1:8001']", "sglang", "note", "engines inside the Ray job"),
    (G + "override_existing_update_group=auto", "sglang", "note", "vLLM weight-sync group option"),
    (G + "use_conversation_multi_turn=true", "sglang", "note", "single-turn GSM8K"),
    (G + "max_turns=1", "sglang", "note", "single-turn GSM8K"),
    (G + "max_turns=3", "sglang", "error", "generator.max_turns=3: rlctl runs single-turn episodes only"),
    (G + "zero_reward_on_non_stop=false", "sglang", "note", "not implemented"),
    (G + "zero_reward_on_non_stop=true", "sglang", "error", "use generator.apply_overlong_filtering=true"),
    # gpu_memory_utilization is a real field: SGLang's mem_fraction_static; no effect with hf
    (G + "gpu_memory_utilization=0.5", "sglang", "translate", (G + "gpu_memory_utilization", 0.5)),
    (G + "gpu_memory_utilization=0.5", "hf", "note", "only used by SGLang (mem_fraction_static)"),
    # sampling names
    (S + "max_generate_length=512", "sglang", "translate", (S + "max_new_tokens", 512)),
    (E + "max_generate_length=64", "sglang", "translate", (E + "max_new_tokens", 64)),
    (S + "max_tokens=512", "sglang", "translate", (S + "max_new_tokens", 512)),
    (S + "sampling_seed=7", "sglang", "translate", (S + "seed", 7)),
    (S + "min_tokens=1", "sglang", "error", "SGLang does not support min_tokens"),
    (S + "min_tokens=1", "hf", "error", "rlctl's hf generator does not support min_tokens"),
    (S + "min_new_tokens=1", "sglang", "error", "SGLang does not support min_new_tokens"),
    (S + "min_tokens=0", "sglang", "note", "generator.sampling_params.min_tokens=0 has no effect: neutral value"),
    (S + "include_stop_str_in_output=true", "sglang", "error", "SGLang does not support include_stop_str_in_output"),
    (S + "stop=['####']", "sglang", "error", "the engine runs without its tokenizer; use generator.sampling_params.stop_token_ids"),
    (S + "stop=x", "hf", "error", "use generator.sampling_params.stop_token_ids"),
    (S + "stop_regex=x", "sglang", "error", "use generator.sampling_params.stop_token_ids"),
    (S + "logprobs=1", "sglang", "note", "rlctl always returns the logprob of every sampled token"),
    (S + "n=1", "sglang", "note", "generator.n_samples_per_prompt"),
    (S + "n=4", "sglang", "error", "use generator.n_samples_per_prompt"),
    (S + "repetition_penalty=1.0", "sglang", "note", "neutral value"),
    (S + "repetition_penalty=1.1", "sglang", "error", "rollout logprobs would no longer be the policy's"),
    (S + "presence_penalty=0.0", "sglang", "note", "neutral value"),
    (S + "presence_penalty=0.5", "sglang", "error", "penalties change the sampling distribution"),
    (S + "frequency_penalty=0.0", "hf", "note", "neutral value"),
    (S + "frequency_penalty=0.5", "hf", "error", "penalties change the sampling distribution"),
    (S + "skip_special_tokens=true", "sglang", "note", "rlctl keeps token ids"),
    (S + "spaces_between_special_tokens=true", "sglang", "note", "rlctl keeps token ids"),
    (S + "no_stop_trim=true", "sglang", "note", "stop token included"),
    (S + "ignore_eos=false", "sglang", "note", "end-of-turn token"),
    (S + "ignore_eos=true", "sglang", "error", "rollouts must stop at the end-of-turn token"),
    (S + "best_of=2", "sglang", "error", "use generator.n_samples_per_prompt"),
    (S + "use_beam_search=true", "sglang", "error", "beam search is not supported"),
]


def test_table_covers_every_name():
    named = {c[0].split("=")[0].rsplit(".", 1)[-1] for c in CASES}
    assert set(VLLM_GENERATOR_KEYS) | set(VLLM_SAMPLING_KEYS) | {"gpu_memory_utilization"} == named


@pytest.mark.parametrize("override,backend,outcome,expected", CASES, ids=[f"{c[0]}@{c[1]}" for c in CASES])
def test_vllm_name(override, backend, outcome, expected):
    extra = ["trainer.device=cpu"] if backend == "hf" else []
    if "tensor_parallel_size" in override:
        extra.append("generator.num_inference_engines=2")  # 2 engines x TP 2 = the 4 policy workers
    key = override.split("=")[0]
    if outcome == "error":
        with pytest.raises(ConfigError) as exc:
            load_config(overrides=[override, *extra], backend=backend)
        assert len(exc.value.errors) == 1, exc.value.errors
        assert exc.value.errors[0].startswith(key + "=") and expected in exc.value.errors[0]
        return
    loaded = load_config(overrides=[override, *extra], backend=backend)
    if outcome == "translate":
        path, value = expected
        obj = loaded.cfg
        for part in path.split("."):
            obj = getattr(obj, part)
        assert obj == value
        if path != key:
            assert any(n.startswith(key) and path in n for n in loaded.notes), loaded.notes
    else:
        assert any(n.startswith(key) and expected in n for n in loaded.notes), loaded.notes


def test_translation_conflicts_are_errors():
    with pytest.raises(ConfigError, match="generator.enforce_eager=true: conflicts with generator.sglang.disable_cuda_graph=false"):
        load_config(overrides=[G + "enforce_eager=true", G + "sglang.disable_cuda_graph=false"])
    with pytest.raises(ConfigError, match="conflicts with generator.sampling_params.max_new_tokens=10"):
        load_config(overrides=[S + "max_tokens=20", S + "max_new_tokens=10"])
    # the same value twice is fine
    load_config(overrides=[G + "enforce_eager=true", G + "sglang.disable_cuda_graph=true"])


def test_skyrl_style_yaml_with_vllm_keys(tmp_path):
    f = tmp_path / "skyrl.yaml"
    f.write_text(
        "defaults: [ppo_base_config]\n"
        "generator:\n"
        "  vllm_v1_disable_multiproc: true\n  enable_prefix_caching: true\n  enable_chunked_prefill: true\n"
        "  max_num_batched_tokens: 8192\n  enforce_eager: false\n  max_num_seqs: 1024\n"
        "  sampling_params: {max_generate_length: 1024, temperature: 1.0, top_p: 1.0, min_p: 0.0, top_k: -1, logprobs: null}\n"
    )
    loaded = load_config(config_file=f)
    g = loaded.cfg.generator
    assert g.sglang.max_running_requests == 1024 and g.sglang.disable_cuda_graph is False
    assert g.sglang.disable_radix_cache is False and g.sampling_params.max_new_tokens == 1024
