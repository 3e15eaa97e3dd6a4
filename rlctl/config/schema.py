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
from typing import Annotated, Any, Literal, Optional, Union

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


class DataConfig(_Model):
    # Parquet files written by `rlctl prepare-data gsm8k` (a single string is read as a 1-item list).
    train_data: PathList = Field(default_factory=lambda: ["$HOME/data/gsm8k/train.parquet"])
    val_data: PathList = Field(default_factory=lambda: ["$HOME/data/gsm8k/validation.parquet"])


class ModelConfig(_Model):
    # A Hugging Face hub name or a local folder (~ and $VARS expanded).
    path: ExpandedPath = "Qwen/Qwen2.5-1.5B-Instruct"


class OptimizerConfig(_Model):
    lr: Annotated[float, Field(gt=0)] = 1.0e-6
    adam_betas: list[Annotated[float, Field(ge=0, lt=1)]] = Field(default_factory=lambda: [0.9, 0.999])
    weight_decay: NonNegFloat = 0.01
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    offload_after_step: bool = True  # optimizer state to CPU after each step; only with colocate_all
    num_warmup_steps: Annotated[int, Field(ge=0)] = 0

    @field_validator("adam_betas")
    @classmethod
    def _two_betas(cls, v: list[float]) -> list[float]:
        if len(v) != 2:
            raise ValueError("must be two numbers [beta1, beta2]; e.g. [0.9, 0.999]")
        return v


class FSDPConfig(_Model):
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    fsdp_size: int = -1  # -1 = shard over all policy workers; else must divide them (hybrid sharding)


class RefFSDPConfig(FSDPConfig):
    cpu_offload: bool = True


class PolicyConfig(_Model):
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)
    fsdp_config: FSDPConfig = Field(default_factory=FSDPConfig)


class RefConfig(_Model):
    # The reference model is the initial policy; it runs inside the policy workers.
    fsdp_config: RefFSDPConfig = Field(default_factory=RefFSDPConfig)


class PlacementConfig(_Model):
    colocate_all: bool = True
    colocate_policy_ref: bool = True  # always true in rlctl (no effect)
    policy_num_nodes: PosInt = 1
    policy_num_gpus_per_node: PosInt = 4
    ref_num_nodes: PosInt = 1  # no effect: the reference lives in the policy workers
    ref_num_gpus_per_node: PosInt = 4  # no effect: the reference lives in the policy workers


class AlgorithmConfig(_Model):
    advantage_estimator: Literal["grpo"] = "grpo"
    grpo_norm_by_std: bool = True
    eps_clip_low: NonNegFloat = 0.2
    eps_clip_high: NonNegFloat = 0.2
    policy_loss_type: Literal["regular", "dual_clip"] = "regular"
    clip_ratio_c: Annotated[float, Field(gt=1)] = 3.0  # dual_clip only
    loss_reduction: Literal["token_mean", "sequence_mean", "seq_mean_token_sum_norm"] = "token_mean"
    use_kl_loss: bool = True
    kl_loss_coef: NonNegFloat = 0.001
    kl_estimator_type: Literal["k1", "k2", "k3", "abs"] = "k3"
    use_entropy_loss: bool = False
    entropy_loss_coef: NonNegFloat = 0.01
    zero_variance_filter: bool = False  # drop prompt groups whose rewards are all equal


LoggerName = Literal["wandb", "tensorboard", "console"]


class TrainerConfig(_Model):
    strategy: Literal["fsdp2"] = "fsdp2"  # "fsdp" accepted as an alias (note)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    ref: RefConfig = Field(default_factory=RefConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    gradient_checkpointing: bool = True
    seed: int = 42
    epochs: PosInt = 1
    update_epochs_per_batch: PosInt = 1
    train_batch_size: PosInt = 1024  # prompts per step
    policy_mini_batch_size: PosInt = 256  # prompts per optimizer step (SkyRL semantics)
    micro_train_batch_size_per_gpu: PosInt = 1  # sequences per forward/backward per worker
    micro_forward_batch_size_per_gpu: PosInt = 1  # sequences per no-grad forward per worker
    max_prompt_length: PosInt = 512  # tokens; longer prompts are dropped from the data
    eval_before_train: bool = True
    eval_interval: int = 5  # every N steps and after the last step; -1 disables
    eval_batch_size: PosInt = 1024
    ckpt_interval: int = 10  # every N steps and after the last step; -1 disables (rlctl addition)
    ckpt_path: ExpandedPath = "$HOME/ckpts/"
    max_ckpts_to_keep: int = -1  # -1 keeps all
    resume_mode: Literal["none", "latest", "from_path"] = "latest"  # null is read as "none"
    resume_path: Optional[ExpandedPath] = None  # only with resume_mode=from_path
    # DIVERGENCE: SkyRL has no log_path; rlctl writes metrics, rollouts and config.yaml there.
    log_path: ExpandedPath = "$HOME/rlctl_runs"
    # DIVERGENCE: SkyRL defaults to "wandb"; wandb is an optional extra, so rlctl defaults to tensorboard.
    logger: Union[LoggerName, list[LoggerName]] = "tensorboard"
    project_name: str = "skyrl"
    # DIVERGENCE: SkyRL defaults to "test_run"; rlctl fills "<preset or custom>-seed<seed>" at load
    # time, so `resume_mode=latest` finds the previous run of the same command.
    run_name: Optional[str] = None
    max_steps: Optional[PosInt] = None  # None = until the epochs end
    max_wall_time_s: Optional[Annotated[float, Field(gt=0)]] = None
    # rlctl additions:
    max_bad_steps: PosInt = 3  # stop after this many consecutive steps with a NaN/inf loss or grad norm
    rollout_dump_interval: int = 1  # write sampled rollouts every N steps; -1 disables
    device: Literal["auto", "cpu", "cuda"] = "auto"

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
    max_new_tokens: PosInt = 1024  # always sent explicitly (SGLang's own default, 128, truncates)
    temperature: NonNegFloat = 1.0  # 0 = greedy
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: int = -1  # -1 = no cut
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0)]]] = None  # None = the model's generation-config stops
    seed: Optional[int] = None  # per-request sampling seed (SGLang sampling_seed); None = engine RNG

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (no top-k cut) or >= 1")
        return v


class EvalSamplingParams(SamplingParams):
    # DIVERGENCE: SkyRL's ppo_base_config used temperature 1.0 for eval (newer versions 0.0);
    # rlctl evaluates greedy pass@1.
    temperature: NonNegFloat = 0.0
    # None = same as generator.sampling_params.max_new_tokens (filled at load time)
    max_new_tokens: Optional[PosInt] = None


class SGLangConfig(_Model):
    """SGLang engine arguments (``sglang.Engine(**kwargs)``); only with ``generator.backend=sglang``."""

    attention_backend: Literal["triton", "flashinfer", "fa3", "torch_native"] = "triton"
    sampling_backend: Literal["pytorch", "flashinfer"] = "pytorch"
    disable_cuda_graph: bool = False
    cuda_graph_max_bs_decode: Optional[PosInt] = None  # None = SGLang's default capture sizes
    # rlctl: capture decode graphs only (SGLang cuda_graph_backend_prefill="disabled"): engine start
    # 34 s instead of 125 s on the H200 for about the same rollout speed (shared sglang_notes.md)
    prefill_cuda_graph: bool = False
    disable_radix_cache: bool = False
    max_running_requests: Optional[PosInt] = None
    enable_memory_saver: bool = True  # needed to release memory while colocated
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "error"


class HFConfig(_Model):
    """transformers ``generate`` backend; only with ``generator.backend=hf``."""

    max_batch_size: PosInt = 64  # sequences per generate() call
    dtype: Optional[Literal["bfloat16", "float16", "float32"]] = None  # None: float32 on CPU, model_dtype on CUDA


class GeneratorConfig(_Model):
    # DIVERGENCE: SkyRL defaults to vllm; rlctl runs sglang (GPU) or hf (CPU, tests).
    backend: Literal["sglang", "hf"] = "sglang"
    # DIVERGENCE: SkyRL defaults to true; rlctl's engines are synchronous (true is an error).
    async_engine: bool = False
    batched: bool = True  # always batched in rlctl (no effect)
    run_engines_locally: bool = True  # must be true (remote engines are not supported)
    # DIVERGENCE: SkyRL defaults to 1 engine x tensor parallel 4; rlctl to 4 engines x tensor parallel 1
    # (one engine per GPU: data-parallel engines suit the small models rlctl targets). Both fill the
    # default 4 policy GPUs, so SkyRL command lines that set neither key still validate.
    num_inference_engines: PosInt = 4
    inference_engine_tensor_parallel_size: PosInt = 1  # alias: generator.tensor_parallel_size
    model_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # split placement: the broadcast's process-group backend (SGLang: nccl; hf on CPU: gloo).
    # Colocated engines get the weights over CUDA IPC (sglang) or Ray's object store (hf).
    weight_sync_backend: Literal["nccl", "gloo"] = "nccl"
    weight_sync_bucket_mb: Annotated[int, Field(gt=0)] = 512  # rlctl addition: weight push bucket size
    # rlctl addition: forming the weight-update group and each bucket's broadcast must finish within this
    weight_sync_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    n_samples_per_prompt: PosInt = 5
    gpu_memory_utilization: Annotated[float, Field(gt=0, lt=1)] = 0.8  # SGLang mem_fraction_static
    apply_overlong_filtering: bool = False  # mask out truncated responses from the loss
    max_input_length: Optional[PosInt] = None  # no effect: single-turn prompts use trainer.max_prompt_length
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    eval_sampling_params: EvalSamplingParams = Field(default_factory=EvalSamplingParams)
    sglang: SGLangConfig = Field(default_factory=SGLangConfig)
    hf: HFConfig = Field(default_factory=HFConfig)


class RewardConfig(_Model):
    method: Literal["strict", "flexible"] = "strict"  # strict: last "#### N"; flexible: last number
    correct_score: float = 1.0
    format_score: float = 0.0  # a "#### N" answer that is wrong (strict) gets this
    # rlctl addition, method=strict only: partial credit when the last number is right but the
    # "#### N" format is missing (reward shaping for models that answer in another format)
    flexible_score: Optional[float] = None
    custom_reward_fn: Optional[str] = None  # "module:function" or "path/to/file.py:function"

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
    env_class: Literal["gsm8k"] = "gsm8k"
    reward: RewardConfig = Field(default_factory=RewardConfig)


class RayConfig(_Model):
    """rlctl addition: how the Ray job starts (``ray.init``)."""

    address: Optional[str] = None  # None = start a local cluster; also --ray-address / RAY_ADDRESS
    num_cpus: Optional[PosInt] = None
    num_gpus: Optional[Annotated[int, Field(ge=0)]] = None
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    placement_group_timeout_s: Annotated[float, Field(gt=0)] = 120.0


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

_R = "runtime"
# Every schema leaf: "runtime" (a runtime module reads it: the attribute name appears there),
# "runtime:<name>" (read through <name>, e.g. a RunConfig property), "no-effect:<why>" (accepted,
# check-config notes it when set), or "rule:<which rule rejects values>". tests/unit/test_config_leaves.py
# walks RunConfig and checks that this table is complete.
LEAF_EFFECT: dict[str, str] = {
    "data.train_data": _R,
    "data.val_data": _R,
    "trainer.strategy": "rule:only fsdp2 (fsdp is its alias)",
    "trainer.policy.model.path": _R,
    "trainer.policy.optimizer_config.lr": _R,
    "trainer.policy.optimizer_config.adam_betas": _R,
    "trainer.policy.optimizer_config.weight_decay": _R,
    "trainer.policy.optimizer_config.max_grad_norm": _R,
    # Accepted SkyRL keys the runtime does not read (yet): check-config notes them when set.
    "trainer.policy.optimizer_config.offload_after_step": "no-effect:colocated GPU trainers always offload parameters and optimizer state while the engine runs",
    "trainer.policy.optimizer_config.num_warmup_steps": "no-effect:rlctl uses a constant learning rate (no warmup yet)",
    "trainer.policy.fsdp_config.cpu_offload": "no-effect:FSDP CPU offload is not implemented; colocated trainers offload between phases instead",
    "trainer.policy.fsdp_config.reshard_after_forward": _R,
    "trainer.policy.fsdp_config.fsdp_size": "no-effect:the policy is always sharded over all policy workers (fsdp_size=-1)",
    "trainer.ref.fsdp_config.cpu_offload": "no-effect:the reference model is sharded and offloaded like the policy",
    "trainer.ref.fsdp_config.reshard_after_forward": "no-effect:the reference model is sharded and offloaded like the policy",
    "trainer.ref.fsdp_config.fsdp_size": "no-effect:the reference model is sharded and offloaded like the policy",
    "trainer.placement.colocate_all": _R,
    "trainer.placement.colocate_policy_ref": "no-effect:the reference model always runs inside the policy workers",
    "trainer.placement.policy_num_nodes": "runtime:num_policy_workers",
    "trainer.placement.policy_num_gpus_per_node": "runtime:num_policy_workers",
    "trainer.placement.ref_num_nodes": "no-effect:the reference model runs inside the policy workers",
    "trainer.placement.ref_num_gpus_per_node": "no-effect:the reference model runs inside the policy workers",
    "trainer.algorithm.advantage_estimator": "rule:only grpo",
    "trainer.algorithm.grpo_norm_by_std": _R,
    "trainer.algorithm.eps_clip_low": _R,
    "trainer.algorithm.eps_clip_high": _R,
    "trainer.algorithm.policy_loss_type": _R,
    "trainer.algorithm.clip_ratio_c": _R,
    "trainer.algorithm.loss_reduction": _R,
    "trainer.algorithm.use_kl_loss": _R,
    "trainer.algorithm.kl_loss_coef": _R,
    "trainer.algorithm.kl_estimator_type": _R,
    "trainer.algorithm.use_entropy_loss": _R,
    "trainer.algorithm.entropy_loss_coef": _R,
    "trainer.algorithm.zero_variance_filter": _R,
    "trainer.gradient_checkpointing": _R,
    "trainer.seed": _R,
    "trainer.epochs": _R,
    "trainer.update_epochs_per_batch": _R,
    "trainer.train_batch_size": _R,
    "trainer.policy_mini_batch_size": _R,
    "trainer.micro_train_batch_size_per_gpu": _R,
    "trainer.micro_forward_batch_size_per_gpu": _R,
    "trainer.max_prompt_length": _R,
    "trainer.eval_before_train": _R,
    "trainer.eval_interval": _R,
    "trainer.eval_batch_size": _R,
    "trainer.ckpt_interval": _R,
    "trainer.ckpt_path": "runtime:ckpt_dir",
    "trainer.max_ckpts_to_keep": _R,
    "trainer.resume_mode": _R,
    "trainer.resume_path": _R,
    "trainer.log_path": "runtime:run_dir",
    "trainer.logger": _R,
    "trainer.project_name": "runtime:run_dir",
    "trainer.run_name": "runtime:run_dir",
    "trainer.max_steps": _R,
    "trainer.max_wall_time_s": _R,
    "trainer.max_bad_steps": _R,
    "trainer.rollout_dump_interval": _R,
    "trainer.device": _R,
    "generator.backend": _R,
    "generator.async_engine": "rule:must be false",
    "generator.batched": "no-effect:rlctl always generates the whole batch in one call",
    "generator.run_engines_locally": "rule:must be true (remote engines are not supported)",
    "generator.num_inference_engines": _R,
    "generator.inference_engine_tensor_parallel_size": _R,
    "generator.model_dtype": _R,
    "generator.weight_sync_backend": _R,  # split placement only (colocated: CUDA IPC / Ray object store)
    "generator.weight_sync_bucket_mb": _R,
    "generator.weight_sync_timeout_s": _R,
    "generator.n_samples_per_prompt": _R,
    "generator.gpu_memory_utilization": _R,
    "generator.apply_overlong_filtering": _R,
    "generator.max_input_length": "no-effect:single-turn prompts are limited by trainer.max_prompt_length",
    **{f"generator.{sp}.{k}": _R for sp in ("sampling_params", "eval_sampling_params")
       for k in ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop_token_ids", "seed")},
    "generator.sglang.attention_backend": _R,
    "generator.sglang.sampling_backend": _R,
    "generator.sglang.disable_cuda_graph": _R,
    "generator.sglang.cuda_graph_max_bs_decode": _R,
    "generator.sglang.prefill_cuda_graph": _R,
    "generator.sglang.disable_radix_cache": _R,
    "generator.sglang.max_running_requests": _R,
    "generator.sglang.enable_memory_saver": _R,
    "generator.sglang.log_level": _R,
    "generator.hf.max_batch_size": _R,
    "generator.hf.dtype": _R,
    "environment.env_class": "rule:only gsm8k",
    "environment.reward.method": _R,
    "environment.reward.correct_score": _R,
    "environment.reward.format_score": _R,
    "environment.reward.flexible_score": _R,
    "environment.reward.custom_reward_fn": _R,
    "ray.address": _R,
    "ray.num_cpus": _R,
    "ray.num_gpus": _R,
    "ray.include_dashboard": _R,
    "ray.dashboard_host": _R,
    "ray.placement_group_timeout_s": _R,
}


def _value_at(cfg: BaseModel, path: str) -> Any:
    obj: Any = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj



def to_dict(cfg: RunConfig) -> dict:
    """The config as plain JSON-compatible data (not redacted: pass it through :func:`redact` to show it)."""
    return cfg.model_dump(mode="json")
