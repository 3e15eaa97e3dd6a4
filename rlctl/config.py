"""rlctl's run configuration: one typed schema, its rules, loading with precedence, and redaction.

Everything here is pure Python (pydantic + PyYAML): importing this module never imports torch, ray
or sglang, so ``rlctl check-config`` validates a run in well under a second.

Precedence (lowest first; written once, here and in README "Configuration")::

    schema defaults  <  --preset NAME  <  --config FILE  <  key=value overrides and --backend B

- ``--preset NAME`` reads ``rlctl/presets/NAME.yaml`` (folder: ``$RLCTL_PRESETS_DIR`` or the package's
  ``rlctl/presets/``). A preset may list ``defaults: [other, ...]``: those presets are composed first, in
  order, then the preset itself (Hydra's ``_self_`` entry is accepted and ignored). Cycles are errors.
- ``--config FILE`` is composed the same way: its own ``defaults:`` (preset names) first, then the file.
- ``key=value`` overrides are applied in the order given; ``--backend B`` equals
  ``generator.backend=B`` (applied after the overrides).
- Mappings deep-merge; lists and scalars replace.
- Override values are parsed with ``yaml.safe_load`` and then coerced by the field's type: a string
  field keeps the text as written (``trainer.run_name=0123`` stays ``"0123"``), other fields take the
  YAML value (``data.train_data="['a.parquet','b.parquet']"`` becomes a list).

Key names and defaults follow SkyRL's ``ppo_base_config.yaml``; every divergence is marked
``# DIVERGENCE`` below and listed in the README. vLLM-era names that SkyRL configs carry
(``max_generate_length``, ``enforce_eager``, ``min_tokens``, ...) are not schema fields: they are
translated, reported as having no effect, or rejected (:data:`VLLM_GENERATOR_KEYS`,
:data:`VLLM_SAMPLING_KEYS`).

Validation collects every problem into one :class:`ConfigError`; each line starts with the full key
path (or the file), shows the value given and says how to fix it. Notes ("no effect", translations)
are only reported for keys the user set (a preset value that differs from the schema default, or any
value from ``--config`` / the command line).

Tests: ``pytest tests/unit/test_config*.py tests/unit/test_seed.py tests/unit/test_presets.py``.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "RunConfig",
    "ConfigError",
    "LoadedConfig",
    "load_config",
    "redact",
    "to_dict",
    "presets_dir",
    "list_presets",
    "iter_leaves",
    "LEAF_EFFECT",
    "VLLM_GENERATOR_KEYS",
    "VLLM_SAMPLING_KEYS",
    "REDACTED",
]

REDACTED = "***REDACTED***"


class ConfigError(Exception):
    """Every problem found in a configuration; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str] | str):
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --------------------------------------------------------------------------------------------------
# Path expansion
# --------------------------------------------------------------------------------------------------

_VAR_RE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def sample_data_dir() -> Path:
    """The GSM8K sample bundled with the package (``${RLCTL_SAMPLE_DATA}`` when unset)."""
    import rlctl

    return Path(rlctl.__file__).parent / "data" / "gsm8k_sample"


def expand_path(text: str) -> str:
    """Expand ``$VAR`` / ``${VAR}`` (unset ones are left as written; ``RLCTL_SAMPLE_DATA`` defaults to
    the bundled sample folder) and then a leading ``~``."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in os.environ:
            return os.environ[name]
        if name == "RLCTL_SAMPLE_DATA":
            return str(sample_data_dir())
        return m.group(0)

    return os.path.expanduser(_VAR_RE.sub(sub, text))


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

# --------------------------------------------------------------------------------------------------
# Presets and YAML
# --------------------------------------------------------------------------------------------------

_PRESET_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


def presets_dir() -> Path:
    """``$RLCTL_PRESETS_DIR`` or the package's ``rlctl/presets`` (shipped in the wheel as package data)."""
    env = os.environ.get("RLCTL_PRESETS_DIR")
    if env:
        return Path(expand_path(env))
    return Path(__file__).resolve().parent / "presets"


def list_presets() -> list[tuple[str, str]]:
    """``[(name, description)]`` for every ``presets/*.yaml`` (description: first ``# description:`` line)."""
    out = []
    folder = presets_dir()
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("*.yaml")):
        desc = ""
        try:
            for line in p.read_text(encoding="utf-8").splitlines():
                m = re.match(r"\s*#\s*description:\s*(.*)", line)
                if m:
                    desc = m.group(1).strip()
                    break
        except OSError:
            desc = "(unreadable)"
        out.append((p.stem, desc))
    return out


def _preset_path(name: Any, where: str) -> Path:
    if not isinstance(name, str) or not _PRESET_NAME_RE.fullmatch(name) or name.strip(".") == "":
        raise ConfigError(f"{where}: preset name {name!r} is invalid; use letters, digits, '_', '.', '-' (see `rlctl presets`)")
    folder = presets_dir().resolve()
    stem = name[:-5] if name.endswith(".yaml") else name
    path = (folder / f"{stem}.yaml").resolve()
    if path.parent != folder:
        raise ConfigError(f"{where}: preset {name!r} resolves outside the presets folder {folder}; refused")
    if not path.is_file():
        known = [n for n, _ in list_presets()]
        hint = difflib.get_close_matches(stem, known, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{where}: preset {name!r} not found in {folder} (known: {', '.join(known) or 'none'}){extra}")
    return path


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python object tags) that also reads ``3e-6`` as a float (YAML 1.2);
    YAML 1.1 only knows ``3.0e-6`` and would hand the learning rate over as a string."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _LineDict(dict):
    """A YAML mapping that remembers the 1-based line of each of its keys (``key_lines``), so that
    errors about a key of a config file can say ``file:line``."""

    key_lines: dict


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


def _construct_mapping_with_lines(loader: "_SafeLoader", node: yaml.MappingNode, deep: bool = False) -> _LineDict:
    lines: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" merges may repeat keys on purpose
            continue
        if key_node.tag == "tag:yaml.org,2002:value":  # a bare "=" key is the string "=" (as SafeLoader does)
            key_node.tag = "tag:yaml.org,2002:str"
        key = loader.construct_object(key_node, deep=True)
        try:
            first = lines.get(key)
        except TypeError:  # unhashable key: SafeConstructor reports it
            continue
        if first is not None:
            raise _DuplicateKeyError(None, None, f"duplicate key {key!r} (first on line {first}); give each key once",
                                     key_node.start_mark)
        lines[key] = key_node.start_mark.line + 1
    out = _LineDict(yaml.SafeLoader.construct_mapping(loader, node, deep=deep))
    out.key_lines = lines
    return out


def _construct_yaml_map(loader: "_SafeLoader", node: yaml.MappingNode):
    data = _LineDict()
    data.key_lines = {}
    yield data
    value = _construct_mapping_with_lines(loader, node)
    data.update(value)
    data.key_lines = value.key_lines


_SafeLoader.add_constructor("tag:yaml.org,2002:map", _construct_yaml_map)
yaml.SafeDumper.add_representer(_LineDict, yaml.representer.SafeRepresenter.represent_dict)  # dumps as a mapping


def safe_load(text: str) -> Any:
    """Parse YAML with :class:`_SafeLoader` (safe: Python object tags are refused)."""
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path, label: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read: {exc}") from None
    try:
        data = safe_load(text)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{label}:{exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{label}{line}: {exc.problem} (rlctl reads YAML with safe_load: Python object tags such as "
            f"!!python/object are refused)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{label}{line}: invalid YAML: {problem}") from None
    except (ValueError, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{label}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


@dataclass
class _Layer:
    kind: str  # "preset" | "config" | "override"
    label: str
    data: dict


def _compose(path: Path, label: str, kind: str, stack: tuple[Path, ...]) -> list[_Layer]:
    if path in stack:
        chain = " -> ".join(p.stem for p in (*stack, path))
        raise ConfigError(f"{label}: defaults cycle: {chain}")
    data = _read_yaml(path, label)
    layers: list[_Layer] = []
    defaults = data.pop("defaults", None)
    if defaults is not None:
        if isinstance(defaults, str):
            defaults = [defaults]
        if not isinstance(defaults, list):
            raise ConfigError(f"{label}: defaults must be a list of preset names, got {_fmt(defaults)}")
        for entry in defaults:
            if entry == "_self_":
                continue
            ppath = _preset_path(entry, f"{label}: defaults")
            layers += _compose(ppath, f"preset {ppath.stem} ({ppath})", "preset", (*stack, path))
    layers.append(_Layer(kind, label, data))
    return layers


# --------------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _is_text_field(info: Any) -> bool:
    """True when the field holds a single string (str, Literal of strings, or Optional of those)."""
    tp = _unwrap(info.annotation)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else [tp]
    if len(args) != 1:
        return False
    a = _unwrap(args[0])
    if a is str:
        return True
    if typing.get_origin(a) is Literal:
        return all(isinstance(x, str) for x in typing.get_args(a))
    return False


def _is_optional(info: Any) -> bool:
    tp = _unwrap(info.annotation)
    return typing.get_origin(tp) is Union and type(None) in typing.get_args(tp)


def _safe_yaml_value(text: str) -> Any:
    return safe_load(text)


def _parse_override(item: Any) -> tuple[str, Any]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {_redact_override(item)!r}: expected key=value, e.g. trainer.seed=1")
    key, _, text = item.partition("=")
    key = key.strip()
    if key.startswith("+"):  # Hydra's "add a key" marker: rlctl keys always exist
        key = key[1:]
    if not _KEY_RE.fullmatch(key):
        raise ConfigError(f"override {_redact_override(item)!r}: {key!r} is not a dotted key path, e.g. trainer.seed=1")
    _, info = _field_info(key)
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    if info is not None and _is_text_field(info):
        literal = typing.get_origin(_unwrap(info.annotation)) is Literal
        if (_is_optional(info) or literal) and text.strip() in ("null", "~", "None", ""):
            return key, None
        if quoted:
            try:
                val = safe_load(text)
                if isinstance(val, str):
                    return key, val
            except yaml.YAMLError:
                pass
        return key, text
    shown = REDACTED if _is_secret_path(key) else _redact_text(text)
    try:
        return key, _safe_yaml_value(text)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{key}: override value {shown!r} has a {exc.problem.split(' (first on line')[0]}") from None
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(f"{key}: override value {shown!r} refused: {exc.problem} (YAML is read with safe_load)") from None
    except (yaml.YAMLError, ValueError, RecursionError, OverflowError) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{key}: override value {shown!r} is not valid YAML ({problem}); quote it") from None


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


# --------------------------------------------------------------------------------------------------
# Merging, known-key checks, explicit keys
# --------------------------------------------------------------------------------------------------


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _short_label(label: str) -> str:
    """``preset gsm8k (/path/gsm8k.yaml:3)`` -> ``preset gsm8k``; other labels as they are."""
    return label.split(" (")[0]


def _label_with_line(label: str, line: Optional[int]) -> str:
    """``file`` -> ``file:line``; ``preset x (path)`` -> ``preset x (path:line)``."""
    if line is None:
        return label
    return f"{label[:-1]}:{line})" if label.endswith(")") and " (" in label else f"{label}:{line}"


def _leaf_line(d: Any, path: str) -> Optional[int]:
    """The 1-based line of key ``path`` in a mapping loaded from YAML (None when not from a file)."""
    *parents, last = path.split(".")
    for part in parents:
        d = d.get(part) if isinstance(d, dict) else None
    return getattr(d, "key_lines", {}).get(last) if isinstance(d, dict) else None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and _field_info(path)[0] is not None:
            out.update(_flatten(v, path + "."))
        elif isinstance(v, dict) and _field_info(path)[0] is not None:
            continue
        else:
            out[path] = v
    return out


_EXTRA_NAMES: dict[str, dict[str, str]] = {
    "generator": VLLM_GENERATOR_KEYS,
    "generator.sampling_params": VLLM_SAMPLING_KEYS,
    "generator.eval_sampling_params": VLLM_SAMPLING_KEYS,
}
_ALL_LEAVES = list(LEAF_DEFAULTS)


# names users bring from other trainers (TRL, HF Trainer, verl) for rlctl's keys
_SYNONYMS = {
    "learning_rate": "trainer.policy.optimizer_config.lr",
    "max_grad_norm": "trainer.policy.optimizer_config.max_grad_norm",
    "num_generations": "generator.n_samples_per_prompt",
    "max_completion_length": "generator.sampling_params.max_new_tokens",
    "max_prompt_length": "trainer.max_prompt_length",
    "beta": "trainer.algorithm.kl_loss_coef",
    "epsilon": "trainer.algorithm.eps_clip_low",
    "rollout_n": "generator.n_samples_per_prompt",
    "model_name_or_path": "trainer.policy.model.path",
}


def _suggest(path: str, siblings: list[str]) -> str:
    prefix, _, last = path.rpartition(".")
    pre = f"{prefix}." if prefix else ""
    if last in _SYNONYMS and _SYNONYMS[last] != path:
        return f"; did you mean {_SYNONYMS[last]}?"
    # 1) a close sibling, 2) a leaf elsewhere with the same or a close last segment, 3) a looser sibling
    close = difflib.get_close_matches(last, siblings, n=1, cutoff=0.8)
    if close:
        return f"; did you mean {pre}{close[0]}?"
    by_last: dict[str, list[str]] = {}
    for p in _ALL_LEAVES:
        by_last.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    for name in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75):
        return f"; did you mean {by_last[name][0]}?"
    close = difflib.get_close_matches(last, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {pre}{close[0]}?"
    return ""


def _dict_leaves(d: dict, prefix: str) -> list[tuple[str, Any]]:
    """``[("prefix.a.b", value), ...]`` for the non-dict values of a nested dict (at most 2 are needed;
    none when a nested key is not a plain name)."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            return []
        if isinstance(v, dict) and v:
            sub = _dict_leaves(v, f"{prefix}.{k}")
            if not sub:
                return []
            out += sub
        else:
            out.append((f"{prefix}.{k}", v))
        if len(out) > 1:
            break
    return out


def _check_keys(d: dict, layer: _Layer, errors: list[str], model: type[BaseModel] = RunConfig, prefix: str = "") -> dict:
    """Drop (and report) keys that are neither schema fields nor handled vLLM names."""
    out = _LineDict()
    out.key_lines = getattr(d, "key_lines", {})  # kept for errors that name file:line
    extra = _EXTRA_NAMES.get(prefix.rstrip("."), {})
    names = list(model.model_fields) + list(extra)
    for k, v in d.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            errors.append(f"{layer.label}: key {k!r} under {prefix.rstrip('.') or 'the top level'} is not a valid key name; keys are names like {names[0]}")
            continue
        path = f"{prefix}{k}"
        info = model.model_fields.get(k)
        if info is None and k not in extra:
            line = getattr(d, "key_lines", {}).get(k)
            where = "" if layer.kind == "override" else f" (in {layer.label}{f':{line}' if line else ''})"
            hint = _suggest(path, names)
            leaves = _dict_leaves(v, path) if isinstance(v, dict) else []
            if len(leaves) == 1:  # a.typo.b.c=x: echo what was typed, suggest the whole corrected path
                leaf, leaf_v = leaves[0]
                fixed = hint.removeprefix("; did you mean ").removesuffix("?") + leaf[len(path):] if hint else ""
                if fixed in LEAF_DEFAULTS:
                    hint = f"; did you mean {fixed}?"
                errors.append(f"{_kv(leaf, leaf_v)}: unknown key {path}{where}{hint}; remove or rename it")
            else:
                errors.append(f"{_kv(path, v)}: unknown key{where}{hint}; remove or rename it")
            continue
        sub = _submodel(info.annotation) if info is not None else None
        if sub is not None and v is None:  # an empty YAML section ("trainer:") means no keys
            continue
        if sub is not None and isinstance(v, dict):
            out[k] = _check_keys(v, layer, errors, sub, path + ".")
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        if v == "" or v != v.strip() or any(c in v for c in " ,:#[]{}\n'\""):
            return json.dumps(v)
        return v
    try:
        text = json.dumps(v, default=str)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 200 else text[:197] + "..."


def _is_secret_path(path: str) -> bool:
    """Any segment of a dotted key path looks secret (``hf_token``, ``secrets.github``, ``wandb.api_key``)."""
    return any(is_secret_key(part) for part in str(path).split("."))


def _kv(path: str, value: Any) -> str:
    """``path=value`` for messages; the value under a secret-looking key (``hf_token``, ``*_api_key``,
    ``secrets.*``, ...) is shown as ``***REDACTED***``, whether or not the key exists in the schema, and
    so are secret-looking keys inside a mapping value and the environment's secret values."""
    if value is not None and _is_secret_path(path):
        return f"{path}={REDACTED}"
    return f"{path}={_fmt(redact(value))}"


def _get(d: Any, path: str, default: Any = None) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _has(d: Any, path: str) -> bool:
    sentinel = object()
    return _get(d, path, sentinel) is not sentinel


def _set(d: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        nxt = d.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            d[part] = nxt
        d = nxt
    d[parts[-1]] = value


def _pop(d: Any, path: str) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(d, dict):
            return
        d = d.get(part)
    if isinstance(d, dict):
        d.pop(parts[-1], None)


# --------------------------------------------------------------------------------------------------
# Normalization: aliases and vLLM names (on the merged raw dict, before pydantic)
# --------------------------------------------------------------------------------------------------


class _Collector:
    def __init__(self, explicit: set[str], sources: dict[str, str], source_group: dict[str, int] | None = None):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.explicit = explicit
        self.sources = sources
        self.reported: set[str] = set()  # key paths already reported as errors
        self.given_as: dict[str, str] = {}  # canonical key -> the alias / vLLM name the user wrote
        # key path -> the layer that set it last, all command-line overrides counting as one layer
        self.source_group: dict[str, int] = source_group or {}

    def src(self, path: str) -> str:
        label = self.sources.get(path)
        where = f"{label}" if label and not label.startswith("override") else ""
        if path in self.given_as:
            where = f"given as {self.given_as[path]}" + (f" in {where}" if where else "")
        return f" [{where}]" if where else ""

    def error(self, path: str, value: Any, msg: str, also: tuple[str, ...] = ()) -> None:
        """An error on ``path``; ``also``: the other keys the rule involves, whose sources are named too
        when they differ (``[trainer.policy_mini_batch_size: preset gsm8k-cpu; trainer.train_batch_size:
        command line]``)."""
        self.reported.add(path)
        where = self.src(path)
        if also:
            def name(label: str) -> str:
                return "command line" if label.startswith("override") else _short_label(label)

            names = {k: name(self.sources[k]) for k in (path, *also) if self.sources.get(k)}
            if len(set(names.values())) > 1:
                where = " [" + "; ".join(f"{k}: {v}" for k, v in names.items()) + "]"
        self.errors.append(f"{_kv(path, value)}: {msg}{where}")

    def note(self, path: str, msg: str) -> None:
        self.notes.append(f"{path}: {msg}")

    def warn(self, path: str, msg: str) -> None:
        self.warnings.append(f"{path}: {msg}")

    def no_effect(self, path: str, value: Any, why: str) -> None:
        self.notes.append(f"{_kv(path, value)} has no effect: {why}")


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


# --------------------------------------------------------------------------------------------------
# Pydantic error rewriting
# --------------------------------------------------------------------------------------------------

_TYPE_WORDS = {
    "string_type": "expected a string (quote it in YAML)",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "list_type": "expected a list, e.g. [a, b]",
    "dict_type": "expected a mapping of keys",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "finite_number": "expected a finite number",
    "int_from_float": "expected an integer",
    "none_required": "expected null",
}


def _loc_to_path(loc: tuple) -> str:
    model: Optional[type[BaseModel]] = RunConfig
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            continue
        if model is not None and item in model.model_fields:
            parts.append(item)
            model = _submodel(model.model_fields[item].annotation)
        elif model is not None and not model.model_fields:
            break
        elif model is not None:
            parts.append(str(item))  # unknown key (should have been caught earlier)
            model = None
        # else: union member tags such as 'str' / 'list[str]' / 'literal[...]'
    return ".".join(parts)


def _value_below(layers: list, path: str, top: Optional[int]) -> Optional[tuple[str, Any]]:
    """``(layer label, value)`` of the last layer below ``layers[top]`` that sets ``path``, or None."""
    if top is None:
        return None
    for layer in reversed(layers[:top]):
        if _has(layer.data, path):
            return _short_label(layer.label), _get(layer.data, path)
    return None


def _is_quoted_scalar(value: Any, typ: str) -> bool:
    """A string that would have been the expected number / boolean without its quotes (``"5"``)."""
    if not isinstance(value, str) or typ not in ("int_type", "float_type", "bool_type", "int_from_float"):
        return False
    if len(value) > 64:
        return False
    try:
        loaded = safe_load(value)
    except (yaml.YAMLError, ValueError, RecursionError, OverflowError):
        return False
    if typ == "bool_type":
        return isinstance(loaded, bool)
    if isinstance(loaded, bool) or not isinstance(loaded, (int, float)) or loaded != loaded or loaded in (float("inf"), float("-inf")):
        return False
    return isinstance(loaded, int) if typ in ("int_type", "int_from_float") else True


def _rewrite_error(err: dict) -> tuple[str, Any, str]:
    path = _loc_to_path(err["loc"]) or "(top level)"
    typ = err["type"]
    ctx = err.get("ctx") or {}
    if typ == "literal_error":
        msg = f"must be one of {ctx.get('expected', '')}"
    elif typ in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[typ]
        key = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}[typ]
        msg = f"must be {op} {ctx.get(key)}"
    elif typ == "value_error":
        msg = str(ctx.get("error", err["msg"]))
    elif typ == "extra_forbidden":
        msg = "unknown key; remove it"
    elif typ in _TYPE_WORDS:
        msg = _TYPE_WORDS[typ]
        if _is_quoted_scalar(err.get("input"), typ):
            msg += f", got the string {json.dumps(err['input'])} (quoted in YAML?); remove the quotes"
    else:
        msg = err["msg"]
    return path, err.get("input"), msg


# --------------------------------------------------------------------------------------------------
# Rules on the validated config
# --------------------------------------------------------------------------------------------------


def _looks_like_local_path(p: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else (absolute, ./, ~, a/b/c) is a folder."""
    return p.startswith(("/", ".", "~", "$")) or p.count("/") >= 2 or (os.sep != "/" and os.sep in p)


def _exists(p: str, kind: str = "file") -> bool:
    try:
        return Path(p).is_file() if kind == "file" else Path(p).exists()
    except (OSError, ValueError):  # embedded NUL, name too long, ...
        return False


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
        c.error("trainer.device", "cpu", "SGLang needs CUDA GPUs; use generator.backend=hf (--backend hf) for CPU runs, or trainer.device=auto")
    if not pl.colocate_all and g.weight_sync_backend == "gloo" and sg:
        c.error("generator.weight_sync_backend", "gloo", "SGLang engines receive split-placement weights over NCCL "
                "(GPU to GPU); set generator.weight_sync_backend=nccl")
    if not pl.colocate_all and g.weight_sync_backend == "nccl" and not sg and t.device == "cpu":
        c.error("generator.weight_sync_backend", "nccl", "NCCL needs CUDA GPUs; with trainer.device=cpu split "
                "placement broadcasts weights over gloo: set generator.weight_sync_backend=gloo")
    if sg and g.inference_engine_tensor_parallel_size > 1:
        c.error("generator.inference_engine_tensor_parallel_size", g.inference_engine_tensor_parallel_size,
                "tensor-parallel SGLang engines are not supported by this rlctl version yet; use 1 and one engine per GPU "
                "(generator.num_inference_engines = trainer.placement.policy_num_gpus_per_node)")
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
            )
    fs = t.policy.fsdp_config.fsdp_size
    if fs != -1 and (fs < 1 or workers % fs):
        c.error("trainer.policy.fsdp_config.fsdp_size", fs, f"must be -1 (all {workers} policy workers) or a divisor of {workers}")
    if t.device == "cpu" and not sg and workers > 1 and "trainer.placement.policy_num_gpus_per_node" in ex:
        c.note("trainer.placement.policy_num_gpus_per_node", f"on CPU each of the {workers} policy workers is a process (gloo)")

    # --- batch sizes (SkyRL semantics: train and mini batches in prompts, micro batches in sequences)
    n = g.n_samples_per_prompt
    if n < 2:
        c.error("generator.n_samples_per_prompt", n, "GRPO compares samples of the same prompt, it needs at least 2; e.g. generator.n_samples_per_prompt=5")
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
    if mini_seqs % step_seqs:
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
            c.error("trainer.logger", t.logger, msg)
        else:
            c.warn("trainer.logger", msg)

    # --- files
    for key in ("data.train_data", "data.val_data"):
        for i, p in enumerate(getattr(cfg.data, key.split(".")[1])):
            if not _exists(p):
                fix = "run `rlctl prepare-data gsm8k` or fix the path"
                if for_training:
                    c.error(f"{key}[{i}]", p, f"file does not exist; {fix}")
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
            c.error("trainer.policy.model.path", mp, f"local model folder does not exist; {fix}")
        else:
            c.warn("trainer.policy.model.path", f"local model folder {mp} does not exist; {fix}")
    fn = cfg.environment.reward.custom_reward_fn
    if fn:
        left = fn.rpartition(":")[0]
        if (left.endswith(".py") or "/" in left) and not _exists(os.path.expanduser(left)):
            if for_training:
                c.error("environment.reward.custom_reward_fn", fn, f"file {left} does not exist")
            else:
                c.warn("environment.reward.custom_reward_fn", f"file {left} does not exist")


def _value_at(cfg: BaseModel, path: str) -> Any:
    obj: Any = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------------
# load_config
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedConfig:
    """A validated config plus what check-config reports about it."""

    cfg: RunConfig
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    explicit: set[str] = field(default_factory=set)  # key paths set by a preset/config/override
    sources: list[str] = field(default_factory=list)  # layer labels, lowest precedence first
    preset: Optional[str] = None


def load_config(
    preset: Optional[str] = None,
    config_file: Optional[str | Path] = None,
    overrides: Any = (),
    backend: Optional[str] = None,
    for_training: bool = False,
) -> LoadedConfig:
    """Resolve defaults < preset < config file < overrides (+ backend), validate, and apply the rules.

    ``for_training=True`` turns missing data files, a missing local model folder and a missing
    custom reward file into errors (``check-config`` reports them as warnings).

    Raises:
        ConfigError: every problem found, one line each.
    """
    try:
        return _load(preset, config_file, overrides, backend, for_training)
    except ConfigError as exc:
        raise ConfigError([_redact_text(e) for e in exc.errors]) from None
    except RecursionError:
        raise ConfigError("configuration: nested too deeply") from None


def _load(preset, config_file, overrides, backend, for_training) -> LoadedConfig:
    errors: list[str] = []
    layers: list[_Layer] = []
    if preset is not None:
        try:
            path = _preset_path(preset, "--preset")
            layers += _compose(path, f"preset {path.stem} ({path})", "preset", ())
        except ConfigError as exc:
            errors += exc.errors
    if config_file is not None:
        cpath = Path(expand_path(str(config_file)))
        try:
            layers += _compose(cpath.resolve() if cpath.exists() else cpath, str(config_file), "config", ())
        except ConfigError as exc:
            errors += exc.errors
    # a preset is composed once (as Hydra does): a --config file whose defaults list the base preset that
    # --preset already composed (the seed's "defaults: - ppo_base_config") must not undo the preset's values
    seen: set[str] = set()
    repeated: list[str] = []
    kept: list[_Layer] = []
    for layer in layers:
        if layer.kind == "preset" and layer.label in seen:
            repeated.append(_short_label(layer.label))
            continue
        seen.add(layer.label)
        kept.append(layer)
    layers = kept
    if isinstance(overrides, str):
        overrides = [overrides]
    items = list(overrides or ())
    if backend is not None:
        items.append(("--backend", f"generator.backend={backend}"))
    for item in items:
        label, text = item if isinstance(item, tuple) else (f"override {_redact_override(item)!r}", item)
        try:
            key, value = _parse_override(text)
            layers.append(_Layer("override", label, _nest(key, value)))
        except ConfigError as exc:
            errors += exc.errors

    # known keys, per layer (so errors name the file)
    for layer in layers:
        layer.data = _check_keys(layer.data, layer, errors)

    raw: dict = {}
    explicit: set[str] = set()
    sources: dict[str, str] = {}
    source_at: dict[str, int] = {}  # key path -> index of the layer that set it last
    source_group: dict[str, int] = {}  # the same, but all command-line overrides count as one layer
    for i, layer in enumerate(layers):
        raw = _merge(raw, layer.data)
        for path, value in _flatten(layer.data).items():
            line = _leaf_line(layer.data, path) if layer.kind != "override" else None
            sources[path] = _label_with_line(layer.label, line)
            source_at[path] = i
            source_group[path] = len(layers) if layer.kind == "override" else i
            if layer.kind != "preset" or path not in LEAF_DEFAULTS or LEAF_DEFAULTS[path] != value:
                explicit.add(path)

    c = _Collector(explicit, sources, source_group)
    c.notes += [f"{name} is listed in the defaults of {config_file} but was already composed by --preset "
                f"{preset}; applied once, at its first place" for name in dict.fromkeys(repeated)]
    c.errors += errors
    _normalize(raw, c, "sglang")

    # deterministic run name
    if _get(raw, "trainer.run_name") is None:
        seed = _get(raw, "trainer.seed", 42)
        seed_s = str(seed) if isinstance(seed, int) else "42"
        stem = Path(str(preset)).stem if preset is not None else "custom"
        name = re.sub(r"[^A-Za-z0-9_.+=@,-]", "_", f"{stem}-seed{seed_s}")
        if isinstance(raw.get("trainer", {}), dict):
            _set(raw, "trainer.run_name", name)

    # Validate. Leaves with type errors are reported, then replaced by their defaults so that the
    # rules still run on everything else (all errors in one message); rule errors that mention a
    # replaced key are dropped, since they would talk about the default rather than the user's value.
    cfg: Optional[RunConfig] = None
    repaired: set[str] = set()
    for _attempt in range(4):
        try:
            cfg = RunConfig.model_validate(raw)
            break
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                path, value, msg = _rewrite_error(err)
                base = path.split("[")[0]
                if base not in repaired and base not in c.reported:
                    hint = f"; the default is {_fmt(LEAF_DEFAULTS[base])}" if base in LEAF_DEFAULTS else ""
                    below = _value_below(layers, base, source_at.get(base))
                    if below is not None and below[1] != LEAF_DEFAULTS.get(base, object()):
                        # e.g. the preset's value, which the bad one replaced
                        hint = f"; {below[0]} sets {_kv(base, below[1]).split('=', 1)[1]}"
                    c.errors.append(f"{_kv(path, value)}: {msg}{hint}{c.src(base)}")
                repaired.add(base)
                _pop(raw, base)
    if cfg is not None:
        n_before = len(c.errors)
        _rules(cfg, c, for_training)
        if repaired:
            pats = [re.compile(r"(^|[\s.(=])" + re.escape(p.rsplit(".", 1)[-1]) + r"\b") for p in repaired]
            new_errors = [e for e in c.errors[n_before:] if not any(p.search(e.split(":", 1)[-1]) or e.startswith(r) for p, r in zip(pats, repaired))]
            c.errors[n_before:] = new_errors
    if c.errors:
        raise ConfigError(c.errors)
    assert cfg is not None
    return LoadedConfig(
        cfg=cfg,
        notes=[_redact_text(n) for n in c.notes],
        warnings=[_redact_text(w) for w in c.warnings],
        explicit=explicit,
        sources=[layer.label for layer in layers],
        preset=preset,
    )


# --------------------------------------------------------------------------------------------------
# Output and redaction
# --------------------------------------------------------------------------------------------------


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain JSON-compatible data (not redacted: pass it through :func:`redact` to show it)."""
    return cfg.model_dump(mode="json")


_SECRET_ANY = {"secret", "secrets", "password", "passwd", "pwd", "passphrase", "credential", "credentials",
               "authorization", "bearer"}
_SECRET_LAST = {"token", "key", "apikey", "auth"}
_ENV_SECRETS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# scheme://[user]:password@host -- the password may itself hold '@' (the last '@' before the path ends it)
_URL_CRED_RE = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]*:)[^/\s]+@")


def is_secret_key(key: Any) -> bool:
    """Secret-looking key: a segment secret/password/..., or a last segment token/key/apikey.

    ``hf_token``, ``wandb_api_key``, ``password`` and ``client_secret`` are secrets;
    ``max_new_tokens`` and ``stop_token_ids`` are not.
    """
    if not isinstance(key, str):
        return False
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)  # camelCase -> camel_Case
    segs = [x for x in re.split(r"[^A-Za-z0-9]+", s.lower()) if x]
    if not segs:
        return False
    return any(x in _SECRET_ANY for x in segs) or segs[-1] in _SECRET_LAST


def _redact_override(item: Any) -> Any:
    """``key=value`` as shown in messages and source labels: a secret-looking key's value redacted."""
    if isinstance(item, str) and "=" in item:
        key, _, value = item.partition("=")
        if _is_secret_path(key.strip()) and value:
            return f"{key}={REDACTED}"
        return _redact_text(item)
    return _redact_text(item) if isinstance(item, str) else item


def _redact_text(text: str) -> str:
    for name in _ENV_SECRETS:
        val = os.environ.get(name)
        if val and len(val) >= 4:
            text = text.replace(val, REDACTED)
    return _URL_CRED_RE.sub(rf"\1{REDACTED}@", text)


def redact(d: Any) -> Any:
    """A copy of ``d`` with secret-looking keys' values and the environment's secret values replaced."""
    if isinstance(d, dict):
        return {k: (REDACTED if is_secret_key(k) and v is not None else redact(v)) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return type(d)(redact(v) for v in d)
    if isinstance(d, str):
        return _redact_text(d)
    return d
