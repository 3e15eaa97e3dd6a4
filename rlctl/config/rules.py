"""Cross-field rules on the validated config (backend, layout, batch sizes, resume, files) and the
"has no effect" notes for keys the user set. Every problem goes to the collector, so one
:class:`~rlctl.config.errors.ConfigError` lists them all.

Tests: ``pytest tests/unit/test_config.py tests/unit/test_config_leaves.py``.
"""

from __future__ import annotations

import importlib.util
import os

from rlctl.config.errors import _Collector
from rlctl.config.paths import _exists, _looks_like_local_path
from rlctl.config.schema import LEAF_DEFAULTS, LEAF_EFFECT, RunConfig, _value_at

def _attention_heads(model_path: str) -> tuple[int, int, str] | None:
    """``(num_attention_heads, num_key_value_heads, config.json path)`` of the model when its ``config.json`` is in a
    local folder or the Hugging Face cache (:func:`rlctl.config.paths.find_config_json`; no torch); None otherwise."""
    import json

    from rlctl.config.paths import find_config_json

    found = find_config_json(model_path)
    if found is None:
        return None
    try:
        data = json.loads(found.read_text())
        heads = int(data["num_attention_heads"])
        return heads, int(data.get("num_key_value_heads") or heads), str(found)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _rules(cfg: RunConfig, c: _Collector, for_training: bool) -> None:
    t, g, a, pl = cfg.trainer, cfg.generator, cfg.trainer.algorithm, cfg.trainer.placement
    ex = c.explicit
    sg = g.backend == "sglang"

    # --- backend rules
    if g.async_engine:
        engine = "SGLang engines" if sg else "the hf generator"
        c.error("generator.async_engine", True, f"{engine} in rlctl run synchronously (no async engine); set generator.async_engine=false")
    if not g.run_engines_locally:
        c.error("generator.run_engines_locally", False, "remote inference engines are not supported; set generator.run_engines_locally=true")
    if sg and t.device == "cpu":
        asked = (f"generator.backend={c.backend_given} is checked as sglang, rlctl's GPU engine; "
                 if c.backend_given else "")
        c.error("trainer.device", "cpu", f"{asked}SGLang needs CUDA GPUs; use --backend hf (generator.backend=hf) for CPU "
                "runs; on a GPU machine set trainer.device=auto (or cuda) instead")
    if not pl.colocate_all and g.weight_sync_backend == "gloo" and sg:
        c.error("generator.weight_sync_backend", "gloo", "SGLang engines receive split-placement weights over NCCL "
                "(GPU to GPU); set generator.weight_sync_backend=nccl")
    if not pl.colocate_all and g.weight_sync_backend == "nccl" and not sg and t.device == "cpu":
        c.error("generator.weight_sync_backend", "nccl", "NCCL needs CUDA GPUs; with trainer.device=cpu split "
                "placement broadcasts weights over gloo: set generator.weight_sync_backend=gloo")
    tp = g.inference_engine_tensor_parallel_size
    if not sg and tp > 1:
        c.error("generator.inference_engine_tensor_parallel_size", tp,
                "the hf generator has no tensor parallelism (each engine is one process on one device); use 1, or "
                "generator.backend=sglang for tensor-parallel engines")
    if sg and tp > 1:
        if pl.colocate_all and pl.policy_num_gpus_per_node % tp:
            c.error("generator.inference_engine_tensor_parallel_size", tp,
                    f"must divide trainer.placement.policy_num_gpus_per_node ({pl.policy_num_gpus_per_node}): a "
                    "colocated engine runs on the GPUs of trainer ranks i*N..i*N+N-1, which must be on one node",
                    also=("trainer.placement.policy_num_gpus_per_node",))
        heads = _attention_heads(t.policy.model.path)
        # SGLang splits the query heads over the TP ranks, and the key/value heads too, or replicates them when the
        # TP size is a multiple of their count (QKVParallelLinear: num_kv_head_replicas = tp // kv_heads)
        if heads is not None and (heads[0] % tp or (heads[1] % tp and tp % heads[1])):
            c.error("generator.inference_engine_tensor_parallel_size", tp,
                    f"the model's attention heads ({heads[0]} query, {heads[1]} key/value in {heads[2]}) do not "
                    f"split over {tp} ranks: SGLang needs the query heads divisible by the size and the key/value "
                    "heads divisible by it or dividing it", also=("trainer.policy.model.path",))
        c.note("generator.inference_engine_tensor_parallel_size",
               f"{tp}: tensor-parallel SGLang engines are coded and tested on CPU with fakes but have not run on GPUs yet")
    if sg and pl.colocate_all and not g.sglang.enable_memory_saver:
        c.error("generator.sglang.enable_memory_saver", False, "colocated engines must release their GPU memory for the trainer; set generator.sglang.enable_memory_saver=true or trainer.placement.colocate_all=false")
    if g.sampling_params.temperature == 0:
        c.warn("generator.sampling_params.temperature", "0 is greedy: all samples of a prompt are identical, so every GRPO advantage is 0 and nothing is learned; use e.g. 1.0")
    if pl.colocate_all:
        ne_why = ("while colocated (trainer.placement.colocate_all=true) weights go to the engine over CUDA IPC on the same GPU"
                  if sg else "colocated hf generators get the weights through Ray's object store")
        for leaf in ("generator.weight_sync_backend", "generator.weight_sync_timeout_s"):
            if leaf in ex:
                c.no_effect(leaf, getattr(g, leaf.split(".")[-1]), ne_why)
    if g.gpu_memory_utilization > 0.9 and pl.colocate_all and sg:
        c.warn("generator.gpu_memory_utilization", f"{g.gpu_memory_utilization} leaves little GPU memory for the trainer's activations when colocated; 0.8 or lower is safer")

    opc = a.off_policy_correction
    if a.use_rollout_logprobs and opc.tis_ratio_type is not None:
        c.error("trainer.algorithm.use_rollout_logprobs", True,
                "makes the engine's log-probs the old policy, so the TIS ratio pi_old / pi_rollout of "
                f"trainer.algorithm.off_policy_correction.tis_ratio_type={opc.tis_ratio_type} is 1 for every token; set "
                "trainer.algorithm.off_policy_correction.tis_ratio_type=null or trainer.algorithm.use_rollout_logprobs=false",
                also=("trainer.algorithm.off_policy_correction.tis_ratio_type",))
    # the engine's log-probs stand for the policy's (use_rollout_logprobs, or TIS's pi_rollout): sampling that truncates
    # the distribution makes them differ from it
    truncation_why = (
        "so with trainer.algorithm.use_rollout_logprobs=true the ratio's old policy is not the policy's; use the "
        "neutral value" if a.use_rollout_logprobs else
        f"so it is not the policy's: trainer.algorithm.off_policy_correction.tis_ratio_type={opc.tis_ratio_type} "
        "corrects only the engine/trainer log-prob mismatch, not the truncation; use the neutral value for unbiased TIS"
        if opc.tis_ratio_type is not None else None)
    if truncation_why is not None:
        sp = g.sampling_params
        for leaf, value, on in (("top_p", sp.top_p, sp.top_p < 1), ("top_k", sp.top_k, sp.top_k != -1),
                                ("min_p", sp.min_p, sp.min_p > 0)):
            if on:
                c.warn(f"generator.sampling_params.{leaf}",
                       f"{value} truncates the distribution the engine samples from, {truncation_why}")

    if a.async_rollouts.one_step_off:
        key = "trainer.algorithm.async_rollouts.one_step_off"
        if pl.colocate_all:
            c.error(key, True, "needs split placement: with trainer.placement.colocate_all=true the engines share the "
                    "trainer's GPUs and sleep while it trains, so nothing can overlap; set "
                    "trainer.placement.colocate_all=false or trainer.algorithm.async_rollouts.one_step_off=false",
                    also=("trainer.placement.colocate_all",))
        if a.dynamic_sampling.type == "filter":
            c.error(key, True, "cannot be combined with trainer.algorithm.dynamic_sampling.type=filter: its extra "
                    "generations of a step would wait for the engines busy with the next step's rollouts; use "
                    "trainer.algorithm.dynamic_sampling.type=replace or null", also=("trainer.algorithm.dynamic_sampling.type",))
        if opc.tis_ratio_type is None and not a.use_rollout_logprobs:
            c.warn(key, "trains each step on rollouts of the previous step's weights (one step off-policy) without a "
                   "correction; set trainer.algorithm.off_policy_correction.tis_ratio_type=token to weight each token "
                   "by min(pi_old / pi_rollout, token_tis_ratio_clip_high), or trainer.algorithm.use_rollout_logprobs=true "
                   "to clip the ratio against the rollout policy itself")

    ob = a.overlong_buffer
    if ob.len is not None and ob.len > g.sampling_params.max_new_tokens:
        c.error("trainer.algorithm.overlong_buffer.len", ob.len,
                f"must be at most generator.sampling_params.max_new_tokens={g.sampling_params.max_new_tokens} "
                "(the penalty ramps over the last len tokens before that limit)")

    if g.eval_n_samples_per_prompt > 1 and g.eval_sampling_params.temperature == 0:
        c.warn("generator.eval_n_samples_per_prompt",
               f"{g.eval_n_samples_per_prompt} greedy samples (generator.eval_sampling_params.temperature=0) are identical, "
               "so pass@k equals pass@1; set generator.eval_sampling_params.temperature, e.g. 0.6 or 1.0")

    # --- layout
    workers = cfg.num_policy_workers
    if pl.colocate_all:
        gen_gpus = g.num_inference_engines * g.inference_engine_tensor_parallel_size
        if gen_gpus != workers:
            c.error(
                "generator.num_inference_engines",
                g.num_inference_engines,
                f"colocated layout needs generator.num_inference_engines ({g.num_inference_engines}) x "
                f"generator.inference_engine_tensor_parallel_size ({g.inference_engine_tensor_parallel_size}) = {gen_gpus} "
                f"to equal the policy workers trainer.placement.policy_num_nodes x policy_num_gpus_per_node "
                f"({pl.policy_num_nodes} x {pl.policy_num_gpus_per_node} = {workers}); change one of the three keys",
                also=("generator.inference_engine_tensor_parallel_size", "trainer.placement.policy_num_gpus_per_node"),
            )
    fs = t.policy.fsdp_config.fsdp_size
    if fs != -1 and (fs < 1 or workers % fs):
        c.error("trainer.policy.fsdp_config.fsdp_size", fs, f"must be -1 (all {workers} policy workers) or a divisor of {workers}")
    if t.device == "cpu" and not sg and workers > 1 and "trainer.placement.policy_num_gpus_per_node" in ex:
        c.note("trainer.placement.policy_num_gpus_per_node", f"on CPU each of the {workers} policy workers is a process (gloo)")

    # --- batch sizes (SkyRL semantics: train and mini batches in prompts, micro batches in sequences)
    n = g.n_samples_per_prompt
    ds = a.dynamic_sampling
    if n < 2 and ds.type is not None:
        c.error("trainer.algorithm.dynamic_sampling.type", ds.type,
                f"needs generator.n_samples_per_prompt >= 2 (got {n}): a group of one sample never has reward variance, "
                "so no group would ever be informative; raise generator.n_samples_per_prompt or set "
                "trainer.algorithm.dynamic_sampling.type=null")
    elif n < 2 and a.advantage_estimator == "grpo":
        c.error("generator.n_samples_per_prompt", n, "GRPO compares samples of the same prompt, it needs at least 2; e.g. generator.n_samples_per_prompt=5")
    elif n < 2 and a.advantage_estimator == "rloo":
        c.error("generator.n_samples_per_prompt", n, "RLOO's baseline is the mean reward of the other samples of the same prompt, "
                "it needs at least 2; e.g. generator.n_samples_per_prompt=5 (or trainer.algorithm.advantage_estimator=reinforce++)")
    mini_seqs = t.policy_mini_batch_size * n
    step_seqs = t.micro_train_batch_size_per_gpu * workers
    if t.train_batch_size % t.policy_mini_batch_size:
        # suggest mini-batches that also satisfy the micro-batch rule below, and train batches that fit
        divisors = [d for d in range(1, min(t.train_batch_size, 10**5) + 1)
                    if t.train_batch_size % d == 0 and (d * n) % step_seqs == 0][-4:]
        lower = t.train_batch_size - t.train_batch_size % t.policy_mini_batch_size
        multiples = [m for m in (lower, lower + t.policy_mini_batch_size) if m > 0]
        c.error(
            "trainer.policy_mini_batch_size",
            t.policy_mini_batch_size,
            f"trainer.train_batch_size={t.train_batch_size} prompts must be a multiple of trainer.policy_mini_batch_size="
            f"{t.policy_mini_batch_size} prompts; set trainer.train_batch_size to a multiple of {t.policy_mini_batch_size}"
            f" (e.g. {' or '.join(map(str, multiples))})"
            + (f", or trainer.policy_mini_batch_size to a divisor of {t.train_batch_size} that also fits the micro-batches"
               f" (e.g. {', '.join(map(str, divisors))})" if divisors else ""),
            also=("trainer.train_batch_size",),
        )
    budget = t.max_tokens_per_microbatch
    if budget is not None:  # token-budget micro-batches: the sequence counts are not used
        for leaf in ("trainer.micro_train_batch_size_per_gpu", "trainer.micro_forward_batch_size_per_gpu"):
            if leaf in ex:
                c.no_effect(leaf, _value_at(cfg, leaf), f"micro-batches are filled up to trainer.max_tokens_per_microbatch={budget} tokens")
        longest = t.max_prompt_length + g.sampling_params.max_new_tokens
        if budget < longest:
            c.warn("trainer.max_tokens_per_microbatch",
                   f"{budget} tokens is less than trainer.max_prompt_length + generator.sampling_params.max_new_tokens = "
                   f"{longest}: a longer sequence runs alone in its micro-batch (more, smaller forward passes)")
        if mini_seqs % workers:
            c.error("trainer.policy_mini_batch_size", t.policy_mini_batch_size,
                    f"a mini-batch of trainer.policy_mini_batch_size={t.policy_mini_batch_size} prompts x "
                    f"generator.n_samples_per_prompt={n} = {mini_seqs} sequences must split evenly over the {workers} "
                    "policy workers; change one of these keys", also=("generator.n_samples_per_prompt",))
    elif mini_seqs % step_seqs:
        fits = [m for m in range(1, mini_seqs + 1) if mini_seqs % (m * workers) == 0]
        micros = sorted(sorted(fits, key=lambda m: abs(m - t.micro_train_batch_size_per_gpu))[:3])
        c.error(
            "trainer.micro_train_batch_size_per_gpu",
            t.micro_train_batch_size_per_gpu,
            f"a mini-batch of trainer.policy_mini_batch_size={t.policy_mini_batch_size} prompts x generator.n_samples_per_prompt={n} "
            f"= {mini_seqs} sequences must split evenly into trainer.micro_train_batch_size_per_gpu={t.micro_train_batch_size_per_gpu} "
            f"x {workers} policy workers = {step_seqs} sequences per micro-step; change one of these keys"
            + (f" (e.g. trainer.micro_train_batch_size_per_gpu={' or '.join(map(str, micros))})" if micros else ""),
            also=("trainer.policy_mini_batch_size", "generator.n_samples_per_prompt"),
        )

    # --- learning-rate schedule (counted in optimizer steps)
    oc = t.policy.optimizer_config
    decays = oc.scheduler not in ("constant", "constant_with_warmup", "inverse_sqrt")
    if decays and t.max_steps is None:
        c.error("trainer.policy.optimizer_config.scheduler", oc.scheduler,
                "decays the learning rate to 0 over the run, so it needs trainer.max_steps (the horizon); set "
                "trainer.max_steps or use constant_with_warmup")
    opt_steps = t.update_epochs_per_batch * max(1, t.train_batch_size // t.policy_mini_batch_size) * (t.max_steps or 0)
    if t.max_steps is not None and oc.num_warmup_steps >= opt_steps > 0:
        c.warn("trainer.policy.optimizer_config.num_warmup_steps",
               f"{oc.num_warmup_steps} optimizer steps of warmup >= the run's {opt_steps} optimizer steps "
               f"(trainer.max_steps={t.max_steps} x {opt_steps // t.max_steps} per step): the learning rate never "
               "reaches trainer.policy.optimizer_config.lr")

    # --- resume / algorithm / eval
    if t.resume_mode == "from_path" and not t.resume_path:
        c.error("trainer.resume_mode", "from_path", "needs trainer.resume_path=<checkpoint folder>")
    if cfg.environment.reward.format_score > cfg.environment.reward.correct_score:
        c.warn("environment.reward.format_score", f"{cfg.environment.reward.format_score} is higher than environment.reward.correct_score={cfg.environment.reward.correct_score}")

    # --- no-effect notes (explicitly set keys only)
    def ne(path: str, cond: bool, why: str) -> None:
        if cond and path in ex:
            c.no_effect(path, _value_at(cfg, path), why)

    ne("trainer.algorithm.kl_loss_coef", not a.use_kl_loss, "trainer.algorithm.use_kl_loss=false")
    ne("trainer.algorithm.kl_estimator_type", not a.use_kl_loss, "trainer.algorithm.use_kl_loss=false")
    ne("trainer.algorithm.entropy_loss_coef", not a.use_entropy_loss, "trainer.algorithm.use_entropy_loss=false")
    ne("trainer.algorithm.grpo_norm_by_std", a.advantage_estimator != "grpo", "only used with trainer.algorithm.advantage_estimator=grpo")
    ne("trainer.algorithm.off_policy_correction.token_tis_ratio_clip_high", opc.tis_ratio_type != "token",
       "only used with trainer.algorithm.off_policy_correction.tis_ratio_type=token")
    ne("trainer.algorithm.off_policy_correction.sequence_tis_ratio_clip_high", opc.tis_ratio_type != "sequence",
       "only used with trainer.algorithm.off_policy_correction.tis_ratio_type=sequence")
    ne("trainer.algorithm.overlong_buffer.penalty_factor", ob.len is None, "trainer.algorithm.overlong_buffer.len is null (off)")
    ne("trainer.algorithm.dynamic_sampling.max_sample_batches", ds.type != "filter",
       "only used with trainer.algorithm.dynamic_sampling.type=filter")
    ne("trainer.algorithm.dynamic_sampling.min_replace_ratio", ds.type != "replace",
       "only used with trainer.algorithm.dynamic_sampling.type=replace")
    ne("trainer.policy.optimizer_config.num_warmup_steps", oc.scheduler == "constant",
       "trainer.policy.optimizer_config.scheduler=constant has no warmup (use constant_with_warmup)")
    ne("trainer.algorithm.clip_ratio_c", a.policy_loss_type != "dual_clip", "only used with trainer.algorithm.policy_loss_type=dual_clip")
    ne("trainer.resume_path", t.resume_mode != "from_path", "only used with trainer.resume_mode=from_path")
    ne("environment.reward.flexible_score", cfg.environment.reward.method != "strict",
       "only used with environment.reward.method=strict")
    ne("generator.run_engines_locally", g.run_engines_locally, "engines always run inside the Ray job")
    for leaf, eff in LEAF_EFFECT.items():
        if eff.startswith("no-effect:") and leaf != "generator.max_input_length":
            ne(leaf, True, eff.split(":", 1)[1])
    if "generator.max_input_length" in ex and g.max_input_length not in (None, t.max_prompt_length):
        c.no_effect("generator.max_input_length", g.max_input_length, f"single-turn prompts are limited by trainer.max_prompt_length={t.max_prompt_length}")
    ne("generator.gpu_memory_utilization", not sg, "only used by SGLang (mem_fraction_static)")
    for leaf in LEAF_DEFAULTS:
        if leaf.startswith("generator.sglang."):
            ne(leaf, not sg, "only used with generator.backend=sglang")
        elif leaf.startswith("generator.hf."):
            ne(leaf, sg, "only used with generator.backend=hf")
    if "trainer.logger" in ex and "wandb" in t.loggers and importlib.util.find_spec("wandb") is None:
        msg = "wandb is not installed; pip install 'rlctl[wandb]' or use trainer.logger=tensorboard"
        if for_training:
            c.error("trainer.logger", t.logger, msg, machine=True)
        else:
            c.warn("trainer.logger", msg)

    # --- files
    for key in ("data.train_data", "data.val_data"):
        for i, p in enumerate(getattr(cfg.data, key.split(".")[1])):
            if not _exists(p):
                fix = "run `rlctl prepare-data gsm8k` or fix the path"
                if for_training:
                    c.error(f"{key}[{i}]", p, f"file does not exist; {fix}", machine=True)
                else:
                    c.warn(f"{key}[{i}]", f"file {p} does not exist; {fix}")
    mp = t.policy.model.path
    if _looks_like_local_path(mp) and not _exists(mp, "any"):
        if "smollm2" in mp.lower():
            fix = (f"run `rlctl prepare-model smollm2 --output-dir {mp}` (writes SmolLM2-135M-Instruct there) or give a "
                   "hub name like Qwen/Qwen2.5-1.5B-Instruct")
        else:
            fix = "point it at a folder with a Hugging Face model (config.json + weights) or give a hub name like Qwen/Qwen2.5-1.5B-Instruct"
        if for_training:
            c.error("trainer.policy.model.path", mp, f"local model folder does not exist; {fix}", machine=True)
        else:
            c.warn("trainer.policy.model.path", f"local model folder {mp} does not exist; {fix}")
    fn = cfg.environment.reward.custom_reward_fn
    if fn:
        left = fn.rpartition(":")[0]
        if (left.endswith(".py") or "/" in left) and not _exists(os.path.expanduser(left)):
            if for_training:
                c.error("environment.reward.custom_reward_fn", fn, f"file {left} does not exist", machine=True)
            else:
                c.warn("environment.reward.custom_reward_fn", f"file {left} does not exist")
