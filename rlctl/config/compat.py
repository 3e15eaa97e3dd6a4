"""vLLM / SkyRL names that are not rlctl fields: translated to rlctl keys, reported as having no effect,
or rejected, per backend (:data:`VLLM_GENERATOR_KEYS`, :data:`VLLM_SAMPLING_KEYS`). Also the schema
aliases (``trainer.strategy=fsdp``, ``resume_mode: null``). Runs on the merged raw dict, before pydantic.

Tests: ``pytest tests/unit/test_config_vllm_keys.py tests/unit/test_config.py``.
"""

from __future__ import annotations

from typing import Any, Optional

from rlctl.config.errors import _Collector
from rlctl.config.redact import _fmt, _kv
from rlctl.config.schema import LEAF_DEFAULTS
from rlctl.config.tree import _get, _has, _pop, _set

# vLLM / SkyRL generator keys that are not rlctl fields. Outcome per backend: "translate" (becomes the
# named rlctl key, with a note), "note" (accepted, no effect), "error". Implemented in _normalize_generator.
VLLM_GENERATOR_KEYS: dict[str, str] = {
    "tensor_parallel_size": "translate: generator.inference_engine_tensor_parallel_size (both backends)",
    "enforce_eager": "sglang: translate to generator.sglang.disable_cuda_graph; hf: note",
    "max_num_seqs": "sglang: translate to generator.sglang.max_running_requests; hf: note",
    "enable_prefix_caching": "sglang: translate to generator.sglang.disable_radix_cache (negated); hf: note",
    "enable_chunked_prefill": "note (SGLang chunks long prefills by default)",
    "max_num_batched_tokens": "note (SGLang sizes prefill chunks itself)",
    "vllm_v1_disable_multiproc": "note (vLLM only)",
    "weight_transfer_threshold_cuda_ipc_GB": "translate: generator.weight_sync_bucket_mb (GB x 1024)",
    "remote_inference_engine_urls": "note (engines always run locally)",
    "override_existing_update_group": "note (vLLM weight-sync group option)",
    "use_conversation_multi_turn": "note (single-turn GSM8K)",
    "max_turns": "1: note; other values: error (single-turn only)",
    "eval_n_samples_per_prompt": "1: note; other values: error (eval is greedy pass@1)",
    "zero_reward_on_non_stop": "false: note; true: error (use generator.apply_overlong_filtering)",
}

# vLLM sampling names in generator.sampling_params / eval_sampling_params. Implemented in _normalize_sampling.
VLLM_SAMPLING_KEYS: dict[str, str] = {
    "max_generate_length": "translate: max_new_tokens (SkyRL/vLLM name)",
    "max_tokens": "translate: max_new_tokens (vLLM SamplingParams name)",
    "sampling_seed": "translate: seed (SGLang name)",
    "min_tokens": "error (SGLang runs without its tokenizer; min_new_tokens is refused)",
    "min_new_tokens": "error (as min_tokens)",
    "include_stop_str_in_output": "error (no stop strings; stop tokens are always kept in output_ids)",
    "stop": "error: use stop_token_ids (the engine runs without its tokenizer)",
    "stop_regex": "error: use stop_token_ids",
    "logprobs": "note (rlctl always returns the logprob of every sampled token)",
    "n": "1: note; else error: use generator.n_samples_per_prompt",
    "repetition_penalty": "1.0: note; else error (changes the sampling distribution: rollout logprobs would not match the policy)",
    "presence_penalty": "0.0: note; else error (as repetition_penalty)",
    "frequency_penalty": "0.0: note; else error (as repetition_penalty)",
    "skip_special_tokens": "note (rlctl keeps token ids; text is decoded by the reward)",
    "spaces_between_special_tokens": "note (as skip_special_tokens)",
    "no_stop_trim": "note (stop tokens are always kept in output_ids)",
    "ignore_eos": "false: note; true: error (rollouts must end at the end-of-turn token)",
    "best_of": "error (one sample per request; use generator.n_samples_per_prompt)",
    "use_beam_search": "error (sampling only)",
}

def _alias_conflict(raw: dict, c: _Collector, old: str, new: str, value: Any) -> Optional[str]:
    """How an alias / vLLM name ``old`` (value ``value``) relates to its canonical key ``new``: None (``new``
    unset or equal), ``"error"`` (both in one layer; the command line counts as one), ``"alias"`` (``old`` set in a later layer: it wins, as
    any later layer does) or ``"canonical"`` (``new`` set later: it wins and ``old`` is dropped)."""
    if not (_has(raw, new) and new in c.explicit and _get(raw, new) != value):
        return None
    i, j = c.source_group.get(old), c.source_group.get(new)
    if i is None or j is None or i == j:
        return "error"
    return "alias" if i > j else "canonical"


def _ignore_earlier_alias(c: _Collector, old: str, new: str, raw: dict) -> None:
    """``new`` was set in a later layer than its alias ``old``: drop ``old`` with a note."""
    c.notes.append(f"{old} is ignored: {_kv(new, _get(raw, new))} is set in a later layer "
                   f"({c.sources.get(new, '?')})")
    _pop(raw, old)


def _translate(raw: dict, c: _Collector, old: str, new: str, value: Any, why: str,
               give_only: str | None = None) -> None:
    """Move ``old`` to ``new`` (value already converted); a conflicting ``new`` of the same layer is an
    error (ending ``give_only``, default "give only <new>"), otherwise the later layer wins (see
    :func:`_alias_conflict`)."""
    kind = _alias_conflict(raw, c, old, new, value)
    if kind == "error":
        c.error(old, _get(raw, old), f"conflicts with {new}={_fmt(_get(raw, new))}; {give_only or f'give only {new}'}")
    elif kind == "canonical":
        _ignore_earlier_alias(c, old, new, raw)
        return
    else:
        _set(raw, new, value)
        c.explicit.add(new)
        c.given_as[new] = old
        if old in c.sources:  # errors on ``new`` name the file / preset / override that set ``old``
            c.sources[new] = c.sources[old]
        c.note(old, f"{why}; using {new}={_fmt(value)}")
    _pop(raw, old)


def _normalize(raw: dict, c: _Collector, backend_hint: str) -> None:
    trainer = raw.get("trainer")
    if isinstance(trainer, dict):
        if trainer.get("strategy") == "fsdp":
            trainer["strategy"] = "fsdp2"
            c.note("trainer.strategy", "fsdp is an alias of fsdp2 in rlctl (FSDP2, torch fully_shard); using trainer.strategy=fsdp2")
        if "resume_mode" in trainer and trainer["resume_mode"] is None:
            trainer["resume_mode"] = "none"

    gen = raw.setdefault("generator", {})
    if not isinstance(gen, dict):
        return
    backend = gen.get("backend", backend_hint)
    if backend == "vllm":
        c.error("generator.backend", "vllm", "rlctl runs sglang or hf, not vLLM; set generator.backend=sglang (GPU) or generator.backend=hf (CPU)")
        gen.pop("backend")
        backend = "sglang"
    _normalize_generator(raw, gen, c, backend)
    for sp in ("sampling_params", "eval_sampling_params"):
        if isinstance(gen.get(sp), dict):
            _normalize_sampling(raw, gen[sp], f"generator.{sp}", c, backend)
    # eval max_new_tokens follows the training value unless set (SkyRL interpolates it the same way).
    train_mnt = _get(raw, "generator.sampling_params.max_new_tokens", LEAF_DEFAULTS["generator.sampling_params.max_new_tokens"])
    eval_sp = gen.get("eval_sampling_params", {})
    if isinstance(eval_sp, dict) and eval_sp.get("max_new_tokens") is None and isinstance(train_mnt, int) and not isinstance(train_mnt, bool) and train_mnt >= 1:
        _set(raw, "generator.eval_sampling_params.max_new_tokens", train_mnt)


def _normalize_generator(raw: dict, gen: dict, c: _Collector, backend: str) -> None:
    g = "generator."
    sg = backend == "sglang"
    for key in [k for k in gen if k in VLLM_GENERATOR_KEYS]:
        v = gen[key]
        path = g + key
        if key == "tensor_parallel_size":
            new = g + "inference_engine_tensor_parallel_size"
            _translate(raw, c, path, new, v, f"alias of {new}", give_only=f"{path} is an alias, give only {new}")
        elif key == "enforce_eager" and sg:
            if isinstance(v, bool):
                _translate(raw, c, path, g + "sglang.disable_cuda_graph", v, "vLLM name")
            else:
                c.error(path, v, "expected true or false")
                _pop(raw, path)
        elif key == "max_num_seqs" and sg:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                _translate(raw, c, path, g + "sglang.max_running_requests", v, "vLLM name")
            else:
                c.error(path, v, "expected an integer >= 1")
                _pop(raw, path)
        elif key == "enable_prefix_caching" and sg:
            if isinstance(v, bool):
                _translate(raw, c, path, g + "sglang.disable_radix_cache", not v, "vLLM name (negated: SGLang's radix cache is its prefix cache)")
            else:
                c.error(path, v, "expected true or false")
                _pop(raw, path)
        elif key == "weight_transfer_threshold_cuda_ipc_GB":
            if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6:
                _translate(raw, c, path, g + "weight_sync_bucket_mb", max(1, int(round(v * 1024))), "SkyRL name (GB)")
            else:
                c.error(path, v, "expected a positive number of GB; or set generator.weight_sync_bucket_mb")
                _pop(raw, path)
        elif key == "max_turns":
            if v == 1 and not isinstance(v, bool):
                c.no_effect(path, v, "rlctl runs single-turn GSM8K")
            else:
                c.error(path, v, "rlctl runs single-turn episodes only; remove it or set 1")
            _pop(raw, path)
        elif key == "eval_n_samples_per_prompt":
            if v == 1 and not isinstance(v, bool):
                c.no_effect(path, v, "evaluation is pass@1 with one sample per prompt")
            else:
                c.error(path, v, "rlctl evaluates pass@1 with one (greedy) sample per prompt; remove it or set 1")
            _pop(raw, path)
        elif key == "zero_reward_on_non_stop":
            if v is False:
                c.no_effect(path, v, "not implemented in rlctl")
            else:
                c.error(path, v, "not supported; use generator.apply_overlong_filtering=true to drop truncated responses from the loss")
            _pop(raw, path)
        else:
            why = {
                "enable_chunked_prefill": "SGLang chunks long prefills by default" if sg else "vLLM option; the hf backend ignores it",
                "max_num_batched_tokens": "SGLang sizes its prefill chunks itself" if sg else "vLLM option; the hf backend ignores it",
                "vllm_v1_disable_multiproc": "vLLM-only option",
                "remote_inference_engine_urls": "rlctl always runs its engines inside the Ray job",
                "override_existing_update_group": "vLLM weight-sync group option",
                "use_conversation_multi_turn": "rlctl runs single-turn GSM8K",
                "enforce_eager": "the hf backend has no CUDA graphs",
                "max_num_seqs": "the hf backend batches by generator.hf.max_batch_size",
                "enable_prefix_caching": "the hf backend has no prefix cache",
            }[key]
            c.no_effect(path, v, why)
            _pop(raw, path)


_NEUTRAL_PENALTY = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def _normalize_sampling(raw: dict, sp: dict, prefix: str, c: _Collector, backend: str) -> None:
    engine = "SGLang" if backend == "sglang" else "rlctl's hf generator"
    for key in [k for k in sp if k in VLLM_SAMPLING_KEYS]:
        v = sp[key]
        path = f"{prefix}.{key}"
        drop = True
        if key in ("max_generate_length", "max_tokens"):
            new = f"{prefix}.max_new_tokens"
            why = "is the vLLM name"
            kind = _alias_conflict(raw, c, path, new, v)
            if kind == "error":
                c.error(path, v, f"conflicts with {new}={_fmt(_get(raw, new))}; {key} {why}, give only max_new_tokens")
            elif kind == "canonical":
                _ignore_earlier_alias(c, path, new, raw)
            else:
                _set(raw, new, v)
                c.explicit.add(new)
                c.notes.append(f"{path} {why}; using {new}={_fmt(v)}")
        elif key == "sampling_seed":
            _translate(raw, c, path, f"{prefix}.seed", v, "SGLang name")
            drop = False
        elif key in ("min_tokens", "min_new_tokens"):
            if v == 0 and not isinstance(v, bool):  # vLLM's default: no minimum
                c.no_effect(path, v, "neutral value")
            else:
                c.error(path, v, f"{engine} does not support {key} (the engine runs without its tokenizer); remove it")
        elif key == "include_stop_str_in_output":
            c.error(path, v, f"{engine} does not support include_stop_str_in_output (stop tokens are always kept in the output ids); remove it")
        elif key in ("stop", "stop_regex"):
            c.error(path, v, f"string stops are not supported: the engine runs without its tokenizer; use {prefix}.stop_token_ids=[...] (token ids)")
        elif key == "logprobs":
            c.no_effect(path, v, "rlctl always returns the logprob of every sampled token")
        elif key == "n":
            if v == 1 and not isinstance(v, bool):
                c.no_effect(path, v, "one sample per request; the group size is generator.n_samples_per_prompt")
            else:
                c.error(path, v, "use generator.n_samples_per_prompt for the number of samples per prompt")
        elif key in _NEUTRAL_PENALTY:
            neutral = _NEUTRAL_PENALTY[key]
            if v == neutral and not isinstance(v, bool):
                c.no_effect(path, v, "neutral value")
            else:
                c.error(path, v, f"penalties change the sampling distribution, so rollout logprobs would no longer be the policy's (biased ratios and KL); remove it or set {neutral}")
        elif key in ("skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            c.no_effect(path, v, "rlctl keeps token ids (stop token included); the reward decodes them")
        elif key == "ignore_eos":
            if v is False:
                c.no_effect(path, v, "responses always stop at the end-of-turn token")
            else:
                c.error(path, v, "rollouts must stop at the end-of-turn token; remove it")
        elif key == "best_of":
            c.error(path, v, "not supported; one sample per request, use generator.n_samples_per_prompt")
        elif key == "use_beam_search":
            c.error(path, v, "beam search is not supported (GRPO needs samples from the policy); remove it")
        if drop:
            sp.pop(key, None)
