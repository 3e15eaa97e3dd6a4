"""rlctl's run configuration schema: pydantic models (unknown keys rejected everywhere, strict types,
frozen), the leaves (:func:`iter_leaves`, :data:`LEAF_DEFAULTS`) and what each leaf does (:data:`LEAF_EFFECT`).

Key names and defaults follow SkyRL's ``ppo_base_config.yaml``; every divergence is marked
``# DIVERGENCE`` below and listed in the README.

Tests: ``pytest tests/unit/test_config.py tests/unit/test_config_leaves.py``.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from rlctl.config.paths import expand_path

def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


ExpandedPath = Annotated[str, AfterValidator(expand_path)]
PathList = Annotated[list[ExpandedPath], BeforeValidator(_as_list)]


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


class _Model(BaseModel):
    # strict: YAML already produced typed values; "5" for an int field is a mistake worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False, validate_default=True)


PosInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0)]

# What each leaf does, declared next to the field (``json_schema_extra={"effect": ...}``):
#   runtime(default)                  a runtime module reads it (tests/unit/test_config_leaves.py checks that
#                                     the attribute name is read outside rlctl/config/)
#   runtime(default, via="name")      read through ``name`` (e.g. the RunConfig property num_policy_workers)
#   no_effect(default, why="...")     accepted; check-config notes "has no effect: <why>" when it is set
#   rule(default, rejects="...")      a rule or the field's type rejects every other value
# ``factory=`` replaces the default for mutable values (a list). LEAF_EFFECT collects them per key path.


def _leaf(effect: str, default: Any, factory: Optional[Callable[[], Any]]) -> Any:
    extra = {"effect": effect}
    if factory is not None:
        return Field(default_factory=factory, json_schema_extra=extra)
    return Field(default, json_schema_extra=extra)


def runtime(default: Any = None, *, via: Optional[str] = None, factory: Optional[Callable[[], Any]] = None) -> Any:
    """A leaf read at run time (directly, or through the attribute / property ``via``)."""
    return _leaf(f"runtime:{via}" if via else "runtime", default, factory)


def no_effect(default: Any = None, *, why: str, factory: Optional[Callable[[], Any]] = None) -> Any:
    """An accepted leaf that changes nothing; ``why`` ends the "has no effect" note check-config prints."""
    return _leaf(f"no-effect:{why}", default, factory)


def rule(default: Any = None, *, rejects: str, factory: Optional[Callable[[], Any]] = None) -> Any:
    """A leaf with one accepted value; ``rejects`` says which rule refuses the others."""
    return _leaf(f"rule:{rejects}", default, factory)


class DataConfig(_Model):
    # Parquet files written by `rlctl prepare-data gsm8k` (a single string is read as a 1-item list).
    train_data: PathList = runtime(factory=lambda: ["$HOME/data/gsm8k/train.parquet"])
    val_data: PathList = runtime(factory=lambda: ["$HOME/data/gsm8k/validation.parquet"])


class ModelConfig(_Model):
    # A Hugging Face hub name or a local folder (~ and $VARS expanded).
    path: ExpandedPath = runtime("Qwen/Qwen2.5-1.5B-Instruct")


class OptimizerConfig(_Model):
    lr: Annotated[float, Field(gt=0)] = runtime(1.0e-6)
    adam_betas: list[Annotated[float, Field(ge=0, lt=1)]] = runtime(factory=lambda: [0.9, 0.999])
    weight_decay: NonNegFloat = runtime(0.01)
    max_grad_norm: Annotated[float, Field(gt=0)] = runtime(1.0)
    # SkyRL's meaning: the optimizer state goes to the CPU after each step (colocated CUDA runs); parameters and
    # gradients always leave the GPU while the engine runs (rlctl.trainer.PolicyTrainer.offload)
    offload_after_step: bool = runtime(True)
    # learning-rate schedule, transformers' names (cosine_with_warmup = transformers' cosine); stepped per optimizer
    # step. Decaying ones (linear, cosine*, polynomial) end at trainer.max_steps (required for them).
    scheduler: Literal["constant_with_warmup", "constant", "linear", "cosine", "cosine_with_warmup",
                       "cosine_with_restarts", "polynomial", "inverse_sqrt"] = runtime("constant_with_warmup")
    num_warmup_steps: Annotated[int, Field(ge=0)] = runtime(0)  # optimizer steps of linear warmup from 0

    @field_validator("adam_betas")
    @classmethod
    def _two_betas(cls, v: list[float]) -> list[float]:
        if len(v) != 2:
            raise ValueError("must be two numbers [beta1, beta2]; e.g. [0.9, 0.999]")
        return v


_REF_LIKE_POLICY = "the reference model is sharded and offloaded like the policy"


class FSDPConfig(_Model):
    cpu_offload: bool = no_effect(
        False, why="FSDP CPU offload is not implemented; colocated trainers offload between phases instead")
    reshard_after_forward: bool = runtime(True)
    # -1 = shard over all policy workers; else must divide them (hybrid sharding)
    fsdp_size: int = no_effect(-1, why="the policy is always sharded over all policy workers (fsdp_size=-1)")


class RefFSDPConfig(FSDPConfig):
    cpu_offload: bool = no_effect(True, why=_REF_LIKE_POLICY)
    reshard_after_forward: bool = no_effect(True, why=_REF_LIKE_POLICY)
    fsdp_size: int = no_effect(-1, why=_REF_LIKE_POLICY)


class PolicyConfig(_Model):
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)
    fsdp_config: FSDPConfig = Field(default_factory=FSDPConfig)


class RefConfig(_Model):
    # The reference model is the initial policy; it runs inside the policy workers.
    fsdp_config: RefFSDPConfig = Field(default_factory=RefFSDPConfig)


class PlacementConfig(_Model):
    colocate_all: bool = runtime(True)
    colocate_policy_ref: bool = no_effect(True, why="the reference model always runs inside the policy workers")
    policy_num_nodes: PosInt = runtime(1, via="num_policy_workers")
    policy_num_gpus_per_node: PosInt = runtime(4, via="num_policy_workers")
    ref_num_nodes: PosInt = no_effect(1, why="the reference model runs inside the policy workers")
    ref_num_gpus_per_node: PosInt = no_effect(4, why="the reference model runs inside the policy workers")


class OffPolicyCorrectionConfig(_Model):
    """Truncated importance sampling (TIS) of the rollout engine's sampling distribution against the trainer's
    (Yao et al. 2025; rlctl.grpo.tis_weights). SkyRL names; its older ``trainer.algorithm.use_tis`` /
    ``tis_imp_ratio_cap`` are translated (rlctl.config.compat)."""

    # null: off; token: w_t = min(pi_old / pi_rollout, cap) per token; sequence: the product over the response
    tis_ratio_type: Optional[Literal["token", "sequence"]] = runtime(None)
    token_tis_ratio_clip_high: Annotated[float, Field(gt=0)] = runtime(2.0)
    sequence_tis_ratio_clip_high: Annotated[float, Field(gt=0)] = runtime(5.0)


class OverlongBufferConfig(_Model):
    """DAPO's soft overlong punishment (rlctl.grpo.overlong_penalty), SkyRL's DAPO example names: responses longer
    than ``max_new_tokens - len`` tokens lose up to ``penalty_factor`` reward, linearly, all of it at the limit."""

    len: Optional[PosInt] = runtime(None)  # tokens; null = off
    penalty_factor: NonNegFloat = runtime(1.0)


class DynamicSamplingConfig(_Model):
    """Dynamic sampling against groups whose rewards are all equal (no learning signal), SkyRL names: ``filter``
    (DAPO: drop them and generate the next prompts until the batch holds train_batch_size informative groups, at
    most max_sample_batches generations per step) or ``replace`` (POLARIS: overwrite them with copies of
    informative groups of the same batch when at least min_replace_ratio of the groups are informative)."""

    type: Optional[Literal["filter", "replace"]] = runtime(None)  # null: off
    max_sample_batches: PosInt = runtime(30)  # generations per step at most (filter)
    min_replace_ratio: Annotated[float, Field(ge=0, le=1)] = runtime(0.3)  # informative fraction needed (replace)


class AsyncRolloutsConfig(_Model):
    """rlctl addition (SkyRL has one-step-off only as its ``examples/async`` trainer, no key; its
    ``trainer.fully_async`` is a different, many-worker design). ``one_step_off``: in split placement
    (trainer.placement.colocate_all=false) the engines generate step k+1's rollouts while the trainer trains step
    k, so step k+1 trains on rollouts of step k-1's weights (one step stale; rlctl.colocation). Correct for it with
    trainer.algorithm.off_policy_correction (check-config warns without it)."""

    one_step_off: bool = runtime(False)


class AlgorithmConfig(_Model):
    # grpo: (r - group mean) / group std; rloo: leave-one-out group baseline; reinforce++: the reward whitened
    # over the whole batch, token-weighted (rlctl.grpo.compute_advantages)
    advantage_estimator: Literal["grpo", "rloo", "reinforce++"] = runtime("grpo")
    grpo_norm_by_std: bool = runtime(True)  # advantage_estimator=grpo only
    eps_clip_low: NonNegFloat = runtime(0.2)
    eps_clip_high: NonNegFloat = runtime(0.2)
    # gspo: sequence-level ratio (Zheng et al. 2025); use its small clips, see the gsm8k-gspo preset
    policy_loss_type: Literal["regular", "dual_clip", "gspo"] = runtime("regular")
    clip_ratio_c: Annotated[float, Field(gt=1)] = runtime(3.0)  # dual_clip only
    loss_reduction: Literal["token_mean", "sequence_mean", "seq_mean_token_sum_norm"] = runtime("token_mean")
    use_kl_loss: bool = runtime(True)
    kl_loss_coef: NonNegFloat = runtime(0.001)
    kl_estimator_type: Literal["k1", "k2", "k3", "abs"] = runtime("k3")
    use_entropy_loss: bool = runtime(False)
    entropy_loss_coef: NonNegFloat = runtime(0.01)
    zero_variance_filter: bool = runtime(False)  # drop prompt groups whose rewards are all equal
    # slime's --use-rollout-logprobs (verl's rollout-correction "bypass" mode): the engine's log-probs of the sampled
    # tokens are the old policy of the ratio, and the trainer's old-log-prob forward is skipped
    use_rollout_logprobs: bool = runtime(False)
    off_policy_correction: OffPolicyCorrectionConfig = Field(default_factory=OffPolicyCorrectionConfig)
    overlong_buffer: OverlongBufferConfig = Field(default_factory=OverlongBufferConfig)
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    async_rollouts: AsyncRolloutsConfig = Field(default_factory=AsyncRolloutsConfig)


LoggerName = Literal["wandb", "tensorboard", "console"]


class TrainerConfig(_Model):
    strategy: Literal["fsdp2"] = rule("fsdp2", rejects="only fsdp2 (fsdp is its alias)")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    ref: RefConfig = Field(default_factory=RefConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    gradient_checkpointing: bool = runtime(True)
    seed: int = runtime(42)
    epochs: PosInt = runtime(1)
    update_epochs_per_batch: PosInt = runtime(1)
    train_batch_size: PosInt = runtime(1024)  # prompts per step
    policy_mini_batch_size: PosInt = runtime(256)  # prompts per optimizer step (SkyRL semantics)
    micro_train_batch_size_per_gpu: PosInt = runtime(1)  # sequences per forward/backward per worker
    micro_forward_batch_size_per_gpu: PosInt = runtime(1)  # sequences per no-grad forward per worker
    # SkyRL names (rlctl/packing.py). Pack each micro-batch's sequences into one padding-free row
    # (block-diagonal causal attention from per-sequence position ids; sdpa / eager / flex_attention).
    # Alias: trainer.use_sample_packing. Off by default until measured on the GPU.
    remove_microbatch_padding: bool = runtime(False)
    # Real tokens (prompt + response) per train / no-grad micro-batch instead of the two sequence counts
    # above; a longer sequence runs alone. None = fixed sequence counts.
    max_tokens_per_microbatch: Optional[PosInt] = runtime(None)
    max_prompt_length: PosInt = runtime(512)  # tokens; longer prompts are dropped from the data
    eval_before_train: bool = runtime(True)
    eval_interval: int = runtime(5)  # every N steps and after the last step; -1 disables
    eval_batch_size: PosInt = runtime(1024)
    ckpt_interval: int = runtime(10)  # every N steps and after the last step; -1 disables (rlctl addition)
    ckpt_path: ExpandedPath = runtime("$HOME/ckpts/", via="ckpt_dir")
    max_ckpts_to_keep: int = runtime(-1)  # -1 keeps all
    resume_mode: Literal["none", "latest", "from_path"] = runtime("latest")  # null is read as "none"
    resume_path: Optional[ExpandedPath] = runtime(None)  # only with resume_mode=from_path
    # DIVERGENCE: SkyRL has no log_path; rlctl writes metrics, rollouts and config.yaml there.
    log_path: ExpandedPath = runtime("$HOME/rlctl_runs", via="run_dir")
    # DIVERGENCE: SkyRL defaults to "wandb"; wandb is an optional extra, so rlctl defaults to tensorboard.
    logger: Union[LoggerName, list[LoggerName]] = runtime("tensorboard")
    project_name: str = runtime("skyrl", via="run_dir")
    # DIVERGENCE: SkyRL defaults to "test_run"; rlctl fills "<preset or custom>-seed<seed>" at load
    # time, so `resume_mode=latest` finds the previous run of the same command.
    run_name: Optional[str] = runtime(None, via="run_dir")
    max_steps: Optional[PosInt] = runtime(None)  # None = until the epochs end
    max_wall_time_s: Optional[Annotated[float, Field(gt=0)]] = runtime(None)
    # rlctl addition: seconds of training (the steps' timing/step without eval, log and checkpoint), summed
    # across resumes (checkpoint state); the run ends after the step that reaches it. None = no budget.
    max_train_time_s: Optional[Annotated[float, Field(gt=0)]] = runtime(None)
    # rlctl additions:
    max_bad_steps: PosInt = runtime(3)  # stop after this many consecutive steps with a NaN/inf loss or grad norm
    rollout_dump_interval: int = runtime(1)  # write sampled rollouts every N steps; -1 disables
    device: Literal["auto", "cpu", "cuda"] = runtime("auto")

    @field_validator("eval_interval", "ckpt_interval", "rollout_dump_interval")
    @classmethod
    def _interval(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be a positive number of steps or -1 (disabled)")
        return v

    @field_validator("max_ckpts_to_keep")
    @classmethod
    def _keep(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (keep all) or a positive count")
        return v

    @field_validator("project_name", "run_name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.+=@,-]+", v) or v in (".", ".."):
            raise ValueError("must be a folder name: letters, digits and _ . + = @ , - only (no '/')")
        return v

    @field_validator("logger", mode="before")
    @classmethod
    def _loggers(cls, v: Any) -> Any:
        names = typing.get_args(LoggerName)
        items = v if isinstance(v, list) else [v]
        if not items or any(not isinstance(x, str) or x not in names for x in items) or len(set(map(str, items))) != len(items):
            raise ValueError(f"must be one of {', '.join(names)}, or a non-empty list of them without repeats")
        return v

    @property
    def loggers(self) -> list[str]:
        """``logger`` as a list."""
        return [self.logger] if isinstance(self.logger, str) else list(self.logger)


class SamplingParams(_Model):
    # SGLang names. vLLM names (max_generate_length, min_tokens, ...) are handled by VLLM_SAMPLING_KEYS.
    max_new_tokens: PosInt = runtime(1024)  # always sent explicitly (SGLang's own default, 128, truncates)
    temperature: NonNegFloat = runtime(1.0)  # 0 = greedy
    top_p: Annotated[float, Field(gt=0, le=1)] = runtime(1.0)
    top_k: int = runtime(-1)  # -1 = no cut
    min_p: Annotated[float, Field(ge=0, le=1)] = runtime(0.0)
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0)]]] = runtime(None)  # None = the model's generation-config stops
    seed: Optional[int] = runtime(None)  # per-request sampling seed (SGLang sampling_seed); None = engine RNG

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (no top-k cut) or >= 1")
        return v


class EvalSamplingParams(SamplingParams):
    # DIVERGENCE: SkyRL's ppo_base_config used temperature 1.0 for eval (newer versions 0.0);
    # rlctl evaluates greedy pass@1.
    temperature: NonNegFloat = runtime(0.0)
    # None = same as generator.sampling_params.max_new_tokens (filled at load time)
    max_new_tokens: Optional[PosInt] = runtime(None)


class SGLangConfig(_Model):
    """SGLang engine arguments (``sglang.Engine(**kwargs)``); only with ``generator.backend=sglang``."""

    attention_backend: Literal["triton", "flashinfer", "fa3", "torch_native"] = runtime("triton")
    sampling_backend: Literal["pytorch", "flashinfer"] = runtime("pytorch")
    disable_cuda_graph: bool = runtime(False)
    cuda_graph_max_bs_decode: Optional[PosInt] = runtime(None)  # None = SGLang's default capture sizes
    # rlctl: capture decode graphs only (SGLang cuda_graph_backend_prefill="disabled"): engine start
    # 34 s instead of 125 s on the H200 for about the same rollout speed (shared sglang_notes.md)
    prefill_cuda_graph: bool = runtime(False)
    disable_radix_cache: bool = runtime(False)
    max_running_requests: Optional[PosInt] = runtime(None)
    enable_memory_saver: bool = runtime(True)  # needed to release memory while colocated
    # SGLang's sleep_on_idle: an idle scheduler waits on its sockets (woken by the next request) instead of looping
    # through its idle checks at 100% of a core. Off (SGLang's default): on an H100 (2026-12-07, same visit) the
    # engine generated 10% fewer tokens/s with it on (25.4k vs 28.3k) and it was one of the three changes before the
    # runs that stopped learning (docs/benchmarks.md 5d); what it saves (one CPU core while the trainer runs) is
    # not measured.
    sleep_on_idle: bool = runtime(False)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = runtime("error")


class HFConfig(_Model):
    """transformers ``generate`` backend; only with ``generator.backend=hf``."""

    max_batch_size: PosInt = runtime(64)  # sequences per generate() call
    dtype: Optional[Literal["bfloat16", "float16", "float32"]] = runtime(None)  # None: float32 on CPU, model_dtype on CUDA


class GeneratorConfig(_Model):
    # DIVERGENCE: SkyRL defaults to vllm; rlctl runs sglang (GPU) or hf (CPU, tests).
    backend: Literal["sglang", "hf"] = runtime("sglang")
    # DIVERGENCE: SkyRL defaults to true; rlctl's engines are synchronous (true is an error).
    async_engine: bool = rule(False, rejects="must be false")
    batched: bool = no_effect(True, why="rlctl always generates the whole batch in one call")
    run_engines_locally: bool = rule(True, rejects="must be true (remote engines are not supported)")
    # DIVERGENCE: SkyRL defaults to 1 engine x tensor parallel 4; rlctl to 4 engines x tensor parallel 1
    # (one engine per GPU: data-parallel engines suit the small models rlctl targets). Both fill the
    # default 4 policy GPUs, so SkyRL command lines that set neither key still validate.
    num_inference_engines: PosInt = runtime(4)
    inference_engine_tensor_parallel_size: PosInt = runtime(1)  # alias: generator.tensor_parallel_size
    model_dtype: Literal["bfloat16", "float16", "float32"] = runtime("bfloat16")
    # split placement: the broadcast's process-group backend (SGLang: nccl; hf on CPU: gloo).
    # Colocated engines get the weights over CUDA IPC (sglang) or Ray's object store (hf).
    weight_sync_backend: Literal["nccl", "gloo"] = runtime("nccl")
    weight_sync_bucket_mb: Annotated[int, Field(gt=0)] = runtime(512)  # rlctl addition: weight push bucket size
    # rlctl addition: forming the weight-update group and each bucket's broadcast must finish within this
    weight_sync_timeout_s: Annotated[float, Field(gt=0)] = runtime(300.0)
    n_samples_per_prompt: PosInt = runtime(5)
    # eval samples per problem: 1 = pass@1 (greedy with the default eval temperature 0); k > 1 reports the mean
    # accuracy and pass@k over k samples of generator.eval_sampling_params
    eval_n_samples_per_prompt: PosInt = runtime(1)
    gpu_memory_utilization: Annotated[float, Field(gt=0, lt=1)] = runtime(0.8)  # SGLang mem_fraction_static
    apply_overlong_filtering: bool = runtime(False)  # mask out truncated responses from the loss
    max_input_length: Optional[PosInt] = no_effect(None, why="single-turn prompts are limited by trainer.max_prompt_length")
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    eval_sampling_params: EvalSamplingParams = Field(default_factory=EvalSamplingParams)
    sglang: SGLangConfig = Field(default_factory=SGLangConfig)
    hf: HFConfig = Field(default_factory=HFConfig)


class RewardConfig(_Model):
    method: Literal["strict", "flexible"] = runtime("strict")  # strict: last "#### N"; flexible: last number
    correct_score: float = runtime(1.0)
    format_score: float = runtime(0.0)  # a "#### N" answer that is wrong (strict) gets this
    # rlctl addition, method=strict only: partial credit when the last number is right but the
    # "#### N" format is missing (reward shaping for models that answer in another format)
    flexible_score: Optional[float] = runtime(None)
    custom_reward_fn: Optional[str] = runtime(None)  # "module:function" or "path/to/file.py:function"

    @field_validator("custom_reward_fn")
    @classmethod
    def _spec(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        left, sep, fn = v.rpartition(":")
        if not sep or not left or not fn.isidentifier():
            raise ValueError('must be "module:function" or "path/to/file.py:function"')
        if not (left.endswith(".py") or "/" in left or os.sep in left):
            if not all(part.isidentifier() for part in left.split(".")):
                raise ValueError('module part must be a dotted Python name, e.g. "my_rewards:score"')
        return v


class EnvironmentConfig(_Model):
    env_class: Literal["gsm8k"] = rule("gsm8k", rejects="only gsm8k")
    reward: RewardConfig = Field(default_factory=RewardConfig)


class RayConfig(_Model):
    """rlctl addition: how the Ray job starts (``ray.init``)."""

    address: Optional[str] = runtime(None)  # None = start a local cluster; also --ray-address / RAY_ADDRESS
    num_cpus: Optional[PosInt] = runtime(None)
    num_gpus: Optional[Annotated[int, Field(ge=0)]] = runtime(None)
    include_dashboard: bool = runtime(False)
    dashboard_host: str = runtime("127.0.0.1")
    placement_group_timeout_s: Annotated[float, Field(gt=0)] = runtime(120.0)


class RunConfig(_Model):
    """The whole run. Build it with :func:`load_config` (which also applies the rules)."""

    data: DataConfig = Field(default_factory=DataConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @property
    def run_dir(self) -> Path:
        """``<trainer.log_path>/<trainer.project_name>/<trainer.run_name>``."""
        t = self.trainer
        return Path(t.log_path) / t.project_name / (t.run_name or "run")

    @property
    def ckpt_dir(self) -> Path:
        """``<trainer.ckpt_path>/<trainer.project_name>/<trainer.run_name>``."""
        t = self.trainer
        return Path(t.ckpt_path) / t.project_name / (t.run_name or "run")

    @property
    def num_policy_workers(self) -> int:
        p = self.trainer.placement
        return p.policy_num_nodes * p.policy_num_gpus_per_node


# --------------------------------------------------------------------------------------------------
# Leaves and their classification
# --------------------------------------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _submodel(tp: Any) -> Optional[type[BaseModel]]:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    return None


def iter_leaves(model: type[BaseModel] = RunConfig, prefix: str = ""):
    """Yield ``(key_path, FieldInfo)`` for every leaf (non-model field) of ``model``."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _submodel(info.annotation)
        if sub is not None:
            yield from iter_leaves(sub, path + ".")
        else:
            yield path, info


def _field_info(path: str) -> tuple[Optional[type[BaseModel]], Any]:
    """``(model, FieldInfo)`` for a dotted path: model set when the path is a section, FieldInfo when a leaf."""
    model: type[BaseModel] = RunConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            return None, None
        sub = _submodel(info.annotation)
        if i == len(parts) - 1:
            return sub, info
        if sub is None:
            return None, None
        model = sub
    return None, None


def _leaf_default(info: Any) -> Any:
    if info.default_factory is not None:
        return info.default_factory()
    return info.default


LEAF_DEFAULTS: dict[str, Any] = {path: _leaf_default(info) for path, info in iter_leaves()}

# Every leaf's effect, from its field metadata (see runtime / no_effect / rule above): "runtime",
# "runtime:<name>", "no-effect:<why>" or "rule:<which rule rejects values>".
LEAF_EFFECT: dict[str, str] = {path: (info.json_schema_extra or {}).get("effect", "") for path, info in iter_leaves()}


def _value_at(cfg: BaseModel, path: str) -> Any:
    obj: Any = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj



def to_dict(cfg: RunConfig) -> dict:
    """The config as plain JSON-compatible data (not redacted: pass it through :func:`redact` to show it)."""
    return cfg.model_dump(mode="json")
