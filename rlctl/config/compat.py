"""vLLM / SkyRL names that are not rlctl fields, and the schema's value aliases.

SkyRL configs carry vLLM-era names (``generator.enforce_eager``, ``sampling_params.max_generate_length``,
``min_tokens``, ...). Each one is, per backend, translated to an rlctl key (:class:`Translate`, with a
note), accepted with a "has no effect" note (:class:`NoEffect`, possibly only for a neutral value) or
rejected (:class:`Refuse`). ONE table per section says which (:data:`VLLM_GENERATOR_KEYS`,
:data:`VLLM_SAMPLING_KEYS`); ONE interpreter (:func:`_apply_table`) walks it. Everything runs on the merged
raw dict, before pydantic validation (:func:`_normalize`).

Message templates may use ``{old}`` (the full key path as given), ``{new}`` (the full translated path),
``{key}`` (the name as given), ``{prefix}`` (its section), ``{engine}`` (``SGLang`` or ``rlctl's hf
generator``), ``{why}`` and, in notes, ``{value}`` (the translated value as shown in messages).

Tests: ``pytest tests/unit/test_config_vllm_keys.py tests/unit/test_config_fuzz.py tests/unit/test_config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from rlctl.config.errors import _Collector
from rlctl.config.redact import _fmt, _kv
from rlctl.config.schema import LEAF_DEFAULTS
from rlctl.config.tree import _get, _has, _pop, _set

# --------------------------------------------------------------------------------------------------
# The table's vocabulary
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Translate:
    """The name becomes the rlctl key ``to`` (relative to the name's section), with a note.

    ``check``: a value test; a failing value is the error ``invalid`` (and the name is dropped).
    ``convert``: old value -> new value. ``give_only``: the end of the conflict error (default
    "give only {new}"). ``note``: the note template (default "{old}: {why}; using {new}={value}").
    ``neutral``: values for which the name means "off" / "unset": dropped with a "has no effect: neutral
    value" note instead of being translated.
    """

    to: str
    why: str
    check: Optional[Callable[[Any], bool]] = None
    invalid: str = ""
    convert: Callable[[Any], Any] = lambda v: v
    give_only: Optional[str] = None
    note: Optional[str] = None
    neutral: Optional[Callable[[Any], bool]] = None


@dataclass(frozen=True)
class NoEffect:
    """Accepted and dropped with a "has no effect: ``why``" note; when ``neutral`` is given, only values
    it accepts are, and any other value is the error ``otherwise``."""

    why: str
    neutral: Optional[Callable[[Any], bool]] = None
    otherwise: str = ""


@dataclass(frozen=True)
class Refuse:
    """Always an error: ``error``."""

    error: str


Outcome = Union[Translate, NoEffect, Refuse]
BACKENDS = ("sglang", "hf")


def _both(outcome: Outcome) -> dict[str, Outcome]:
    return {b: outcome for b in BACKENDS}


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_gb(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6


def _equals(neutral: Any) -> Callable[[Any], bool]:
    """``v == neutral`` for numbers, booleans excluded (``true == 1`` in Python)."""
    return lambda v: v == neutral and not isinstance(v, bool)


def _is_false(v: Any) -> bool:
    return v is False


def _penalty(neutral: float) -> dict[str, Outcome]:
    return _both(NoEffect("neutral value", neutral=_equals(neutral), otherwise=(
        "penalties change the sampling distribution, so rollout logprobs would no longer be the policy's "
        f"(biased ratios and KL); remove it or set {neutral}")))


_HF_IGNORES = "vLLM option; the hf backend ignores it"
_KEEPS_IDS = NoEffect("rlctl keeps token ids (stop token included); the reward decodes them")

# --------------------------------------------------------------------------------------------------
# The table: section -> {name: {backend: outcome}}
# --------------------------------------------------------------------------------------------------

# vLLM / SkyRL keys under ``generator`` that are not rlctl fields.
VLLM_GENERATOR_KEYS: dict[str, dict[str, Outcome]] = {
    "tensor_parallel_size": _both(Translate("inference_engine_tensor_parallel_size", "alias of {new}",
                                            give_only="{old} is an alias, give only {new}")),
    "enforce_eager": {"sglang": Translate("sglang.disable_cuda_graph", "vLLM name", check=_is_bool, invalid="expected true or false"),
                      "hf": NoEffect("the hf backend has no CUDA graphs")},
    "max_num_seqs": {"sglang": Translate("sglang.max_running_requests", "vLLM name", check=_is_count, invalid="expected an integer >= 1"),
                     "hf": NoEffect("the hf backend batches by generator.hf.max_batch_size")},
    "enable_prefix_caching": {
        "sglang": Translate("sglang.disable_radix_cache", "vLLM name (negated: SGLang's radix cache is its prefix cache)",
                            check=_is_bool, invalid="expected true or false", convert=lambda v: not v),
        "hf": NoEffect("the hf backend has no prefix cache")},
    "enable_chunked_prefill": {"sglang": NoEffect("SGLang chunks long prefills by default"), "hf": NoEffect(_HF_IGNORES)},
    "max_num_batched_tokens": {"sglang": NoEffect("SGLang sizes its prefill chunks itself"), "hf": NoEffect(_HF_IGNORES)},
    "vllm_v1_disable_multiproc": _both(NoEffect("vLLM-only option")),
    "weight_transfer_threshold_cuda_ipc_GB": _both(Translate(
        "weight_sync_bucket_mb", "SkyRL name (GB)", check=_is_gb,
        invalid="expected a positive number of GB; or set generator.weight_sync_bucket_mb",
        convert=lambda v: max(1, int(round(v * 1024))))),
    "remote_inference_engine_urls": _both(NoEffect("rlctl always runs its engines inside the Ray job")),
    "override_existing_update_group": _both(NoEffect("vLLM weight-sync group option")),
    "use_conversation_multi_turn": _both(NoEffect("rlctl runs single-turn GSM8K")),
    "max_turns": _both(NoEffect("rlctl runs single-turn GSM8K", neutral=_equals(1),
                                otherwise="rlctl runs single-turn episodes only; remove it or set 1")),
    "zero_reward_on_non_stop": _both(NoEffect(
        "not implemented in rlctl", neutral=_is_false,
        otherwise="not supported; use generator.apply_overlong_filtering=true to drop truncated responses from the loss")),
}

# vLLM names in ``generator.sampling_params`` / ``generator.eval_sampling_params`` (rlctl uses SGLang's).
_MAX_NEW_TOKENS = _both(Translate("max_new_tokens", "is the vLLM name", note="{old} {why}; using {new}={value}",
                                  give_only="{key} {why}, give only max_new_tokens"))
_MIN_TOKENS = _both(NoEffect("neutral value", neutral=_equals(0),  # vLLM's default: no minimum
                             otherwise="{engine} does not support {key} (the engine runs without its tokenizer); remove it"))
_STOP = _both(Refuse("string stops are not supported: the engine runs without its tokenizer; use {prefix}.stop_token_ids=[...] (token ids)"))
VLLM_SAMPLING_KEYS: dict[str, dict[str, Outcome]] = {
    "max_generate_length": _MAX_NEW_TOKENS,  # SkyRL / vLLM name
    "max_tokens": _MAX_NEW_TOKENS,  # vLLM SamplingParams name
    "sampling_seed": _both(Translate("seed", "SGLang name")),
    "min_tokens": _MIN_TOKENS,
    "min_new_tokens": _MIN_TOKENS,
    "include_stop_str_in_output": _both(Refuse(
        "{engine} does not support include_stop_str_in_output (stop tokens are always kept in the output ids); remove it")),
    "stop": _STOP,
    "stop_regex": _STOP,
    "logprobs": _both(NoEffect("rlctl always returns the logprob of every sampled token")),
    "n": _both(NoEffect("one sample per request; the group size is generator.n_samples_per_prompt", neutral=_equals(1),
                        otherwise="use generator.n_samples_per_prompt for the number of samples per prompt")),
    "repetition_penalty": _penalty(1.0),
    "presence_penalty": _penalty(0.0),
    "frequency_penalty": _penalty(0.0),
    "skip_special_tokens": _both(_KEEPS_IDS),
    "spaces_between_special_tokens": _both(_KEEPS_IDS),
    "no_stop_trim": _both(_KEEPS_IDS),
    "ignore_eos": _both(NoEffect("responses always stop at the end-of-turn token", neutral=_is_false,
                                 otherwise="rollouts must stop at the end-of-turn token; remove it")),
    "best_of": _both(Refuse("not supported; one sample per request, use generator.n_samples_per_prompt")),
    "use_beam_search": _both(Refuse("beam search is not supported (GRPO needs samples from the policy); remove it")),
}

def _is_cap(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


# SkyRL's older names under ``trainer.algorithm`` (before ``off_policy_correction``): use_tis=true meant token
# TIS capped at tis_imp_ratio_cap (-1 = unset).
SKYRL_ALGORITHM_KEYS: dict[str, dict[str, Outcome]] = {
    "use_tis": _both(Translate(
        "off_policy_correction.tis_ratio_type", "SkyRL's older name", check=_is_bool, invalid="expected true or false",
        convert=lambda v: "token", neutral=_is_false, note="{old}=true: {why}; using {new}={value}",
        give_only="give only {new}")),
    "tis_imp_ratio_cap": _both(Translate(
        "off_policy_correction.token_tis_ratio_clip_high", "SkyRL's older name",
        check=lambda v: _is_cap(v) or _equals(-1)(v),
        invalid="expected a positive cap or -1 (unset); or set trainer.algorithm.off_policy_correction.token_tis_ratio_clip_high",
        neutral=_equals(-1))),
}

# SkyRL names under ``trainer`` that are aliases of rlctl keys.
TRAINER_KEYS: dict[str, dict[str, Outcome]] = {
    "use_sample_packing": _both(Translate("remove_microbatch_padding", "alias of {new}", check=_is_bool,
                                          invalid="expected true or false",
                                          give_only="{old} is an alias, give only {new}")),
}

# section of the raw config -> its table (loading.py also accepts these names as known keys)
COMPAT_TABLES: dict[str, dict[str, dict[str, Outcome]]] = {
    "trainer.algorithm": SKYRL_ALGORITHM_KEYS,
    "trainer": TRAINER_KEYS,
    "generator": VLLM_GENERATOR_KEYS,
    "generator.sampling_params": VLLM_SAMPLING_KEYS,
    "generator.eval_sampling_params": VLLM_SAMPLING_KEYS,
}

# --------------------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------------------


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


def _translate(raw: dict, c: _Collector, rule: Translate, old: str, new: str, value: Any, words: dict[str, str]) -> None:
    """Move ``old`` to ``new`` (``value`` already converted); a conflicting ``new`` of the same layer is an
    error, otherwise the later layer wins (see :func:`_alias_conflict`); ``old`` is dropped either way."""
    kind = _alias_conflict(raw, c, old, new, value)
    if kind == "error":
        give_only = (rule.give_only or "give only {new}").format(**words)
        c.error(old, _get(raw, old), f"conflicts with {new}={_fmt(_get(raw, new))}; {give_only}")
    elif kind == "canonical":
        c.notes.append(f"{old} is ignored: {_kv(new, _get(raw, new))} is set in a later layer "
                       f"({c.sources.get(new, '?')})")
    else:
        _set(raw, new, value)
        c.explicit.add(new)
        # errors on ``new`` name the key the user wrote and the file / preset / override that set it
        # (``[command line, as generator.tensor_parallel_size]``, see _Collector.src)
        c.given_as[new] = old
        if old in c.sources:
            c.sources[new] = c.sources[old]
        c.notes.append((rule.note or "{old}: {why}; using {new}={value}").format(**words, value=_fmt(value)))
    _pop(raw, old)


def _apply_table(raw: dict, section: str, table: dict[str, dict[str, Outcome]], c: _Collector, backend: str) -> None:
    """Apply ``table`` to the names of ``table`` found in the raw mapping at ``section`` (in the order given):
    translate, note or reject each one for ``backend`` (any backend other than sglang is treated as hf).
    Every name is removed from ``raw``; translations set their rlctl key (marked explicit)."""
    d = _get(raw, section)
    be = "sglang" if backend == "sglang" else "hf"
    engine = "SGLang" if be == "sglang" else "rlctl's hf generator"
    for key in [k for k in d if k in table]:
        rule = table[key][be]
        old, v = f"{section}.{key}", d[key]
        words = {"old": old, "key": key, "prefix": section, "engine": engine}
        if isinstance(rule, Translate):
            new = f"{section}.{rule.to}"
            words.update(new=new, why=rule.why.format(**words, new=new))
            if rule.check is not None and not rule.check(v):
                c.error(old, v, rule.invalid.format(**words))
                _pop(raw, old)
            elif rule.neutral is not None and rule.neutral(v):
                c.no_effect(old, v, "neutral value")
                _pop(raw, old)
            else:
                _translate(raw, c, rule, old, new, rule.convert(v), words)
        elif isinstance(rule, NoEffect) and (rule.neutral is None or rule.neutral(v)):
            c.no_effect(old, v, rule.why.format(**words))
            _pop(raw, old)
        else:
            c.error(old, v, (rule.error if isinstance(rule, Refuse) else rule.otherwise).format(**words))
            _pop(raw, old)


def _normalize(raw: dict, c: _Collector, backend_hint: str) -> None:
    """Rewrite the merged raw config before validation: value aliases (``trainer.strategy=fsdp``,
    ``trainer.resume_mode: null``, ``generator.backend=vllm`` is an error), the vLLM / SkyRL names of
    :data:`COMPAT_TABLES`, and ``generator.eval_sampling_params.max_new_tokens`` defaulting to the
    training value (SkyRL interpolates it the same way). ``backend_hint``: the backend when unset."""
    trainer = raw.get("trainer")
    if isinstance(trainer, dict):
        if trainer.get("strategy") == "fsdp":
            trainer["strategy"] = "fsdp2"
            c.note("trainer.strategy", "fsdp is an alias of fsdp2 in rlctl (FSDP2, torch fully_shard); using trainer.strategy=fsdp2")
        if "resume_mode" in trainer and trainer["resume_mode"] is None:
            trainer["resume_mode"] = "none"

    for section, table in COMPAT_TABLES.items():
        if section.startswith("trainer") and isinstance(_get(raw, section), dict):
            _apply_table(raw, section, table, c, backend_hint)

    gen = raw.setdefault("generator", {})
    if not isinstance(gen, dict):
        return
    backend = gen.get("backend", backend_hint)
    if backend == "vllm":
        c.error("generator.backend", "vllm", "rlctl runs sglang or hf, not vLLM; set generator.backend=sglang (GPU) or generator.backend=hf (CPU)")
        gen.pop("backend")
        backend = "sglang"  # the other checks treat it as sglang (the GPU engine); their messages say so
        c.backend_given = "vllm"
    for section, table in COMPAT_TABLES.items():
        if section.startswith("generator") and isinstance(_get(raw, section), dict):
            _apply_table(raw, section, table, c, backend)
    train_mnt = _get(raw, "generator.sampling_params.max_new_tokens", LEAF_DEFAULTS["generator.sampling_params.max_new_tokens"])
    eval_sp = gen.get("eval_sampling_params", {})
    if isinstance(eval_sp, dict) and eval_sp.get("max_new_tokens") is None and isinstance(train_mnt, int) and not isinstance(train_mnt, bool) and train_mnt >= 1:
        _set(raw, "generator.eval_sampling_params.max_new_tokens", train_mnt)
