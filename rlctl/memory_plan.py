"""GPU memory plan: an estimate of each process's peak GPU memory for a run, checked against the GPU.

Pure Python (no torch, ray, sglang or transformers import), so ``rlctl check-config`` and ``rlctl train``
(before Ray starts) can print and check it. Inputs: the model's ``config.json`` (:func:`find_config_json`,
:meth:`ModelShape.from_config_json`), the validated :class:`rlctl.config.RunConfig` and the GPU memory
in bytes (:func:`local_gpu_bytes` reads it through ``nvidia-smi``; ``None`` plans without a fit check).

What is estimated, per GPU (bytes; P parameters, N FSDP shards = policy workers, dt = compute dtype bytes):

- trainer (``rlctl/trainer.py``): fp32 master weights 4P/N, fp32 gradients 4P/N, AdamW moments 8P/N,
  the reference model when KL is on (in the compute dtype, sharded like the policy: dt P/N), the
  unsharded compute copies FSDP2 gathers (``fsdp_unsharded_blocks`` decoder blocks + the root:
  embeddings, final norm, untied LM head), the activations of the largest micro-batch
  (``micro x (max_prompt_length + max_new_tokens)`` tokens, with or without gradient checkpointing),
  the log-prob working set (logits of at most ``logprob_chunk_positions`` response positions at a time:
  rlctl/logprobs.py chunks them), the weight-sync buckets, its CUDA context, and what
  it keeps on the GPU after offload while the engine runs (colocated);
- SGLang engine: its static memory ``gpu_memory_utilization x GPU`` (SGLang's ``mem_fraction_static``
  sizes the KV cache so that weights + KV cache + the GPU's other use reach that fraction), what it
  allocates outside that fraction (CUDA graphs, sampling buffers) and what it keeps while asleep.

Phases (the peak of the layout is the largest phase): colocated (``trainer.placement.colocate_all``:
one GPU holds a trainer rank and an engine, which sleep in turn) has rollout, weight sync, log-probs and
train phases on the shared GPU; split placement has the trainer's phases on the policy GPUs and the
rollout on the engine GPUs. Every coefficient is in :data:`COEFFICIENTS` with where its value comes
from; the estimate's stated error is :data:`ERROR_FRACTION`. :func:`check_fit` refuses a plan over the
GPU by more than that error (naming the keys that would make it fit, with the GiB each saves), warns
within it, and lets :data:`OVERRIDE_FLAG` run anyway.

Test: ``pytest tests/unit/test_memory_plan.py``; calibration against measured runs:
``python benchmarks/memory_calibration.py RUN_DIR...``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from rlctl.config.paths import _looks_like_local_path, find_config_json  # noqa: F401 - find_config_json: part of this module's interface

if TYPE_CHECKING:  # pragma: no cover
    from rich.tree import Tree

    from rlctl.config import RunConfig

GiB = 1 << 30
MiB = 1 << 20

#: The estimator's stated relative error: a peak within ``gpu x (1 +- ERROR_FRACTION)`` warns, above refuses.
#: Assumed (no calibration of the trainer's peak exists yet; see benchmarks/memory_calibration.py).
ERROR_FRACTION = 0.20

#: The documented override: run although the plan says the GPU is too small (the CLI flag's name).
OVERRIDE_FLAG = "--ignore-memory-plan"

#: Every coefficient of the estimate. Where a value comes from is in the comment; "assumed, to be
#: calibrated" means no GPU measurement has fixed it yet (benchmarks/memory_calibration.py compares).
COEFFICIENTS: dict[str, float] = {
    # A CUDA context (driver + cuBLAS/NCCL workspaces) per process on a GPU: assumed, to be calibrated
    # (commonly 0.3-0.6 GiB on H100/H200 with torch 2.x).
    "cuda_context_bytes": 0.5 * GiB,
    # What a colocated trainer keeps on the GPU after offload (empty_cache leaves the allocator's
    # in-use blocks): assumed (<= 1 GiB), to be calibrated. NOTE: docs/results/qwen05-h200 saw 13.3 GiB
    # in use with the engine asleep and the trainer offloaded from step 2 on (3.6 GiB at step 1).
    "trainer_kept_after_offload_bytes": 1.0 * GiB,
    # What an SGLang engine keeps while asleep besides its scheduler's CUDA context (tensors outside the memory
    # saver's tags, and the CUDA context of the Ray actor that hosts sglang.Engine, which reads free memory).
    # MEASURED once (docs/benchmarks.md 5c: H200, Qwen2.5-Coder-0.5B, gsm8k-h200, colocated): 4.10 GiB in use
    # with the engine asleep and the trainer offloaded = 2 x 0.5 GiB contexts + 0.55 GiB trainer reserve + 2.55 GiB;
    # rounded to 2.5 GiB (was 1 GiB assumed).
    "engine_asleep_bytes": 2.5 * GiB,
    # SGLang memory outside mem_fraction_static with decode CUDA graphs (graph pools, sampling
    # buffers): from docs/results/qwen05-h200 (engine_build_bytes 77.998e9 - 0.5 x 150.75e9 GPU =
    # 2.6e9, which also holds part of the trainer's concurrent load): 2 GiB; to be calibrated.
    "engine_outside_fraction_bytes": 2.0 * GiB,
    # The same without CUDA graphs (generator.sglang.disable_cuda_graph=true): from
    # docs/results/gpu-tests-2026-11-29-split (split run, fraction 0.5: 75.443e9 - 75.38e9 = 0.06e9)
    # and the colocated run there (fraction 0.3: 45.15e9 built vs 45.23e9): rounded up to 0.25 GiB.
    "engine_outside_fraction_no_graph_bytes": 0.25 * GiB,
    # Decoder blocks FSDP2 holds unsharded at once (the one computing + the one prefetched): FSDP2's
    # default forward/backward prefetch of one block (torch.distributed.fsdp.fully_shard docs).
    "fsdp_unsharded_blocks": 2,
    # Activations saved for backward per token per decoder layer without checkpointing, in values of
    # the compute dtype, MEASURED (benchmarks/activation_bytes.py: autograd's saved tensors of transformers'
    # Qwen2 decoder layer, bf16, sdpa with the padding mask the trainer passes; 2026-12-07, transformers 5.25):
    # 8 h (the two RMSNorm outputs, q, k and v after sdpa's repeat to every head, the attention output, the
    # o_proj and MLP inputs), 4 i (gate, up, silu(gate), their product), 0 kv (the repeat makes k / v h-sized),
    # plus fp32 2 h (the RMSNorms' upcast inputs). Qwen2.5-0.5B shape: 60,416 B planned vs 60,864 B saved,
    # 1.5B: 108,544 vs 109,240 (the rest: rotary cos / sin and the attention log-sum-exp).
    # tests/unit/test_memory_plan.py re-measures it. The step's peak on a GPU still has to be calibrated.
    "act_values_per_token_layer_h": 8,
    "act_values_per_token_layer_kv": 0,
    "act_values_per_token_layer_i": 4,
    # fp32 values per token per layer: the two RMSNorms upcast their input to fp32 and keep it.
    "act_fp32_values_per_token_layer_h": 2,
    # With gradient checkpointing (non-reentrant, per decoder layer): the layer input kept per token
    # per layer, in compute-dtype values of h; plus the layers whose activations (and their gradients)
    # exist during one layer's recomputation and backward. Assumed, to be calibrated.
    "act_ckpt_values_per_token_layer_h": 1,
    "ckpt_recomputed_layers": 2,
    # No-grad forward (log-probs): decoder layers' activations alive at once (one layer computing).
    "forward_transient_layers": 1,
    # Log-prob working set (rlctl/logprobs.py): logits exist for at most logprob_chunk_positions response
    # positions at a time (rlctl.logprobs.CHUNK_POSITIONS), bytes per (position x vocab entry): the bf16 chunk (2)
    # + its fp32 log-softmax (4) + the softmax / gradient of the chunk (4) in training; + the fp32 [V, H]
    # gradient of the LM head accumulated over chunks. Assumed (10 / 6), to be calibrated.
    "logprob_chunk_positions": 1024,
    "logprob_train_bytes_per_token_vocab": 10,
    "logprob_forward_bytes_per_token_vocab": 6,
    # The caching allocator's slack: a phase's peak *reserved* memory exceeds what its tensors allocate, because
    # blocks freed by one micro-batch do not fit the next one's shapes exactly. Planned as this fraction of the
    # phase's transient bytes (activations + log-prob working set). FITTED (least squares on relative error,
    # benchmarks/memory_calibration.py --fit) on four H200 trainer probes of 2026-12-07 (Qwen2.5-0.5B and 1.5B
    # shapes x micro-batches 16 / 32 and 8 / 16, 552-token rows, no checkpointing; torch 2.11): 0.26, which
    # puts those four within -5%..+5% of the measured max_memory_reserved and the held-out setting (1.5B shape,
    # micro 8 / 16, 1,064-token rows, checkpointing) at +5% (docs/benchmarks.md section 5c).
    "allocator_slack_fraction": 0.26,
    # Weight sync: a flattened bucket of generator.weight_sync_bucket_mb plus the gathered tensors it
    # is copied from (rlctl/weight_sync.py iter_weight_buckets).
    "weight_sync_bucket_copies": 2,
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

#: The config leaves the plan reads (``plan_inputs`` keys); suggestions change these.
PLAN_KEYS = (
    "trainer.policy.model.path",
    "trainer.placement.colocate_all",
    "trainer.placement.policy_num_nodes",
    "trainer.placement.policy_num_gpus_per_node",
    "trainer.micro_train_batch_size_per_gpu",
    "trainer.micro_forward_batch_size_per_gpu",
    "trainer.max_tokens_per_microbatch",
    "trainer.gradient_checkpointing",
    "trainer.max_prompt_length",
    "trainer.train_batch_size",
    "trainer.policy_mini_batch_size",
    "trainer.algorithm.use_kl_loss",
    "trainer.policy.optimizer_config.offload_after_step",
    "trainer.device",
    "generator.backend",
    "generator.gpu_memory_utilization",
    "generator.num_inference_engines",
    "generator.inference_engine_tensor_parallel_size",
    "generator.model_dtype",
    "generator.n_samples_per_prompt",
    "generator.weight_sync_bucket_mb",
    "generator.sglang.disable_cuda_graph",
    "generator.sampling_params.max_new_tokens",
)


def gib(n: Optional[float]) -> str:
    """``n`` bytes as ``"12.3 GiB"`` (``"?"`` for None)."""
    return "?" if n is None else f"{n / GiB:.1f} GiB"


# ------------------------------------------------------------------------------------------ model shape


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on.

    ``num_parameters`` is computed from the shape (Llama/Qwen2/Qwen3/Mistral layout): per layer
    q/k/v/o projections (+ q/k/v biases when ``attention_bias``; + q/k RMSNorm of ``head_dim`` for
    Qwen3), gate/up/down MLP projections, two RMSNorms; plus the token embedding, the final norm and,
    when the embeddings are not tied, the LM head.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    model_type: str = ""
    source: str = ""  # the config.json it was read from

    @classmethod
    def from_config_json(cls, path_or_dict: "str | os.PathLike | dict") -> "ModelShape":
        """Read a Hugging Face ``config.json`` (a path to the file or its folder, or the parsed dict).

        ``head_dim`` defaults to ``hidden_size / num_attention_heads``, ``num_key_value_heads`` to
        ``num_attention_heads``, ``tie_word_embeddings`` to false; ``attention_bias`` defaults to true
        for ``model_type`` qwen2 (whose config has no such key) and false otherwise. A nested
        ``text_config`` (multimodal configs) is used when the top level has no ``hidden_size``.

        Raises:
            ValueError: the file is missing or not JSON, a required key (named) is missing or not a
                positive integer, or the model is a mixture of experts (not estimated).
        """
        source = ""
        if isinstance(path_or_dict, dict):
            d = path_or_dict
        else:
            p = Path(path_or_dict).expanduser()
            if p.is_dir():
                p = p / "config.json"
            source = str(p)
            try:
                d = json.loads(p.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ValueError(f"{p}: no such file") from None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{p}: not a readable JSON file ({e})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{p}: expected a JSON object")
        where = source or "config.json"
        if "hidden_size" not in d and isinstance(d.get("text_config"), dict):
            d = {**d["text_config"], "tie_word_embeddings": d.get("tie_word_embeddings",
                                                                   d["text_config"].get("tie_word_embeddings", False))}
        for moe in ("num_experts", "num_local_experts", "n_routed_experts"):
            if d.get(moe):
                raise ValueError(f"{where}: {moe}={d[moe]}: mixture-of-experts models are not estimated")

        def need(key: str, default: Any = None) -> int:
            v = d.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {key} must be a positive integer, got {v!r}")
            return v

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        model_type = str(d.get("model_type", ""))
        bias = d.get("attention_bias", model_type == "qwen2")
        return cls(
            hidden_size=hidden, num_layers=need("num_hidden_layers"), num_heads=heads,
            num_kv_heads=need("num_key_value_heads", heads),
            head_dim=need("head_dim", hidden // heads if hidden % heads == 0 else None),
            intermediate_size=need("intermediate_size"), vocab_size=need("vocab_size"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), attention_bias=bool(bias),
            qk_norm=model_type == "qwen3", model_type=model_type, source=source)

    @property
    def kv_dim(self) -> int:
        """Width of the k (and v) projection: ``num_kv_heads x head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def block_parameters(self) -> int:
        """Parameters of one decoder layer."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.kv_dim, self.intermediate_size
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attn + 3 * h * i + norms

    @property
    def root_parameters(self) -> int:
        """Parameters outside the decoder layers: embedding, final norm, untied LM head."""
        emb = self.vocab_size * self.hidden_size
        return emb + self.hidden_size + (0 if self.tie_word_embeddings else emb)

    @property
    def num_parameters(self) -> int:
        """All parameters (tied embeddings counted once)."""
        return self.num_layers * self.block_parameters + self.root_parameters

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes per token of one sequence: k and v of every layer."""
        return 2 * self.num_layers * self.kv_dim * dtype_bytes

    def activation_bytes_per_token_layer(self, dtype_bytes: int) -> float:
        """Bytes one decoder layer saves for backward per token without checkpointing, from the
        ``act_*`` entries of :data:`COEFFICIENTS` (compute-dtype values of h, kv and i, plus fp32 values of h);
        ``benchmarks/activation_bytes.py`` measures the same quantity."""
        C = COEFFICIENTS
        return (dtype_bytes * (C["act_values_per_token_layer_h"] * self.hidden_size
                               + C["act_values_per_token_layer_kv"] * self.kv_dim
                               + C["act_values_per_token_layer_i"] * self.intermediate_size)
                + 4 * C["act_fp32_values_per_token_layer_h"] * self.hidden_size)


def local_gpu_bytes(timeout_s: float = 3.0) -> Optional[int]:
    """Memory in bytes of the smallest GPU a CUDA process started here would see (:mod:`rlctl.gpus`: ``nvidia-smi``
    restricted by ``CUDA_VISIBLE_DEVICES``), read with a ``timeout_s`` timeout; None when ``nvidia-smi`` is absent,
    fails, times out, lists no GPU or every GPU is hidden.
    """
    from rlctl import gpus

    listed = gpus.query(timeout_s)
    seen = gpus.visible(listed, os.environ.get("CUDA_VISIBLE_DEVICES")) if listed else None
    return min(g.memory_bytes for g in seen) if seen else None  # None also for MIG entries: their size is unknown


def gpu_bytes_from_gb(gb: float) -> int:
    """``--gpu-memory-gb N`` in bytes. GPU makers and ``nvidia-smi`` count GPU memory in binary
    units (an "80 GB" H100 shows 81559 MiB), so N is read as GiB (2^30 bytes).

    Raises:
        ValueError: ``gb`` is not a positive finite number.
    """
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not math.isfinite(gb) or gb <= 0:
        raise ValueError(f"--gpu-memory-gb must be a positive number of GiB, got {gb!r}")
    return int(gb * GiB)


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LineItem:
    """One estimated allocation of one process on one GPU: ``bytes`` (None: unknown without the GPU
    size) and ``detail``, how it was computed."""

    key: str
    label: str
    bytes: Optional[int]
    detail: str = ""


@dataclass(frozen=True)
class Phase:
    """A moment of the step and what is on one GPU then: ``parts`` are ``(process, item key)``."""

    name: str
    gpu: str  # "shared GPU" (colocated), "policy GPU" or "engine GPU" (split)
    parts: tuple[tuple[str, str], ...]
    bytes: Optional[int]


@dataclass
class MemoryPlan:
    """Per-process line items (bytes per GPU), the phases of the layout and their peak.

    ``peak`` is the largest phase (None when a phase is unknown: no GPU size for the engine's
    fraction). ``inputs`` are the config values read (:data:`PLAN_KEYS`), so :func:`check_fit` can
    re-plan with one key changed.
    """

    shape: ModelShape
    inputs: dict[str, Any]
    gpu_bytes: Optional[int]
    layout: str  # "colocated" or "split"
    num_gpus: int
    processes: dict[str, list[LineItem]]
    phases: list[Phase]
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the layout cannot work at all (e.g. no KV cache)

    @property
    def peak(self) -> Optional[Phase]:
        """The phase with the most bytes on one GPU; None if any phase is unknown or there is none."""
        if not self.phases or any(p.bytes is None for p in self.phases):
            return None
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak_bytes(self) -> Optional[int]:
        """Bytes of :attr:`peak` (None when unknown)."""
        pk = self.peak
        return None if pk is None else pk.bytes

    def item(self, process: str, key: str) -> LineItem:
        """The line item ``key`` of ``process`` ("trainer" or "engine").

        Raises:
            KeyError: no such item.
        """
        for it in self.processes.get(process, []):
            if it.key == key:
                return it
        raise KeyError(f"{process}.{key}")


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def plan_inputs(cfg: "RunConfig") -> dict[str, Any]:
    """The config values the plan reads, keyed by their config key (:data:`PLAN_KEYS`)."""
    return {k: _get(cfg, k) for k in PLAN_KEYS}


def plan(cfg: "RunConfig", shape: ModelShape, gpu_bytes: Optional[int]) -> MemoryPlan:
    """Estimate the per-GPU peak memory of the run ``cfg`` (a validated RunConfig) for ``shape``.

    ``gpu_bytes`` is one GPU's memory (bytes) or None (the engine's KV cache, a fraction of the GPU,
    and so the engine's phases and the peak stay unknown). See :func:`plan_from_inputs`.
    """
    return plan_from_inputs(plan_inputs(cfg), shape, gpu_bytes)


def _batch_rule_ok(x: dict[str, Any]) -> bool:
    """The config's micro-batch rule: a mini-batch splits evenly into micro-batches over the workers."""
    workers = x["trainer.placement.policy_num_nodes"] * x["trainer.placement.policy_num_gpus_per_node"]
    mini_seqs = x["trainer.policy_mini_batch_size"] * x["generator.n_samples_per_prompt"]
    return mini_seqs % (x["trainer.micro_train_batch_size_per_gpu"] * workers) == 0


def plan_from_inputs(x: dict[str, Any], shape: ModelShape, gpu_bytes: Optional[int]) -> MemoryPlan:
    """:func:`plan` on the values of :func:`plan_inputs` (a dict keyed by config key).

    Line items (bytes per GPU) use :data:`COEFFICIENTS`; tokens of a micro-batch are
    ``micro x (trainer.max_prompt_length + generator.sampling_params.max_new_tokens)`` (the longest a
    micro-batch can be; the trainer trims shared padding), logits cover ``micro x max_new_tokens``
    response positions. With ``trainer.max_tokens_per_microbatch`` B set, every micro-batch (train and
    forward) runs at most ``max(B, max_prompt_length + max_new_tokens)`` tokens (the trainer's planner counts the
    padded size after trimming, or the real tokens when packed; a longer sequence runs alone), and that bounds its
    activations instead of the micro-batch sizes. Raises nothing for valid configs; the plan's ``errors`` say when the
    engine's fraction cannot hold its weights.
    """
    C = COEFFICIENTS
    P, L = shape.num_parameters, shape.num_layers
    h, V = shape.hidden_size, shape.vocab_size
    workers = x["trainer.placement.policy_num_nodes"] * x["trainer.placement.policy_num_gpus_per_node"]
    colocated = bool(x["trainer.placement.colocate_all"])
    dt = DTYPE_BYTES[x["generator.model_dtype"]]
    m_train, m_fwd = x["trainer.micro_train_batch_size_per_gpu"], x["trainer.micro_forward_batch_size_per_gpu"]
    T = x["generator.sampling_params.max_new_tokens"]
    seq = x["trainer.max_prompt_length"] + T
    ckpt = bool(x["trainer.gradient_checkpointing"])
    kl = bool(x["trainer.algorithm.use_kl_loss"])
    sglang = x["generator.backend"] == "sglang"
    notes: list[str] = []
    errors: list[str] = []
    ctx = int(C["cuda_context_bytes"])

    # ---- trainer, per policy GPU
    layer_act = shape.activation_bytes_per_token_layer(dt)
    budget = x.get("trainer.max_tokens_per_microbatch")
    if budget is not None:  # token-budget micro-batches: the budget bounds each forward, whatever the sizes say
        train_tokens = fwd_tokens = max(int(budget), seq)
        train_desc = fwd_desc = f"max({budget}, {seq}) tokens (trainer.max_tokens_per_microbatch)"
        resp_train = resp_fwd = train_tokens
    else:
        train_tokens, fwd_tokens = m_train * seq, m_fwd * seq
        train_desc, fwd_desc = f"{m_train} x {seq} tokens", f"{m_fwd} x {seq} tokens"
        resp_train, resp_fwd = m_train * T, m_fwd * T
    if ckpt:
        per_token = L * C["act_ckpt_values_per_token_layer_h"] * h * dt + C["ckpt_recomputed_layers"] * layer_act
        act_detail = (f"{train_desc} x ({L} layers x {dt} B x {h} kept + "
                      f"{C['ckpt_recomputed_layers']:g} recomputed layers x {layer_act:,.0f} B); checkpointing on")
    else:
        per_token = L * layer_act
        act_detail = f"{train_desc} x {L} layers x {layer_act:,.0f} B/token/layer; checkpointing off"
    copies = int((C["fsdp_unsharded_blocks"] * shape.block_parameters + shape.root_parameters) * dt)
    chunk = C["logprob_chunk_positions"]
    bucket = int(x["generator.weight_sync_bucket_mb"] * MiB * C["weight_sync_bucket_copies"])
    trainer = [
        LineItem("cuda_context", "CUDA context", ctx, "cuda_context_bytes"),
        LineItem("master_weights", "policy weights, fp32 master", math.ceil(4 * P / workers), f"4 B x {P:,} params / {workers} shards"),
        LineItem("gradients", "gradients, fp32", math.ceil(4 * P / workers), f"4 B x {P:,} / {workers} shards"),
        LineItem("adamw_state", "AdamW moments, fp32", math.ceil(8 * P / workers), f"2 x 4 B x {P:,} / {workers} shards"),
    ]
    if kl:
        trainer.append(LineItem("reference_weights", f"reference model, {x['generator.model_dtype']}",
                                math.ceil(dt * P / workers),
                                f"{dt} B x {P:,} / {workers} shards (KL on; stored in the compute dtype, never trained)"))
    transient = {  # phase -> its (activations, log-prob working set) items; the allocator's slack scales their sum
        "train": (LineItem("train_activations", "activations, train micro-batch", int(train_tokens * per_token), act_detail),
                  LineItem("train_logits", "log-prob working set, train micro-batch",
                           int(min(resp_train, chunk) * V * C["logprob_train_bytes_per_token_vocab"] + 4 * V * h),
                           f"min({resp_train}, {chunk:g}) positions x {V:,} vocab x "
                           f"{C['logprob_train_bytes_per_token_vocab']:g} B + fp32 LM-head gradient 4 B x {V:,} x {h}")),
        "forward": (LineItem("forward_activations", "activations, log-prob forward",
                             int(fwd_tokens * C["forward_transient_layers"] * layer_act),
                             f"{fwd_desc} x {C['forward_transient_layers']:g} layer x {layer_act:,.0f} B"),
                    LineItem("forward_logits", "log-prob working set, log-prob forward",
                             int(min(resp_fwd, chunk) * V * C["logprob_forward_bytes_per_token_vocab"]),
                             f"min({resp_fwd}, {chunk:g}) positions x {V:,} vocab x "
                             f"{C['logprob_forward_bytes_per_token_vocab']:g} B")),
    }
    slack = C["allocator_slack_fraction"]
    trainer += [
        LineItem("compute_copies", "unsharded compute copies", copies,
                 f"{dt} B x ({C['fsdp_unsharded_blocks']:g} blocks x {shape.block_parameters:,} + root {shape.root_parameters:,})"),
        *transient["train"], *transient["forward"],
        *(LineItem(f"{phase}_slack", f"allocator slack, {'train' if phase == 'train' else 'log-prob forward'}",
                   int(slack * (act.bytes + logits.bytes)),
                   f"allocator_slack_fraction={slack:g} x ({act.label} + {logits.label} = {gib(act.bytes + logits.bytes)}): "
                   "the caching allocator's reserve beyond what is allocated")
          for phase, (act, logits) in transient.items()),
        LineItem("weight_sync_buckets", "weight-sync buckets", bucket,
                 f"{C['weight_sync_bucket_copies']:g} x generator.weight_sync_bucket_mb={x['generator.weight_sync_bucket_mb']} MiB"),
    ]
    if colocated:
        trainer.append(LineItem("kept_after_offload", "kept after offload (engine running)",
                                int(C["trainer_kept_after_offload_bytes"]), "trainer_kept_after_offload_bytes"))
    processes: dict[str, list[LineItem]] = {"trainer": trainer}

    # ---- engine, per engine GPU
    tp = x["generator.inference_engine_tensor_parallel_size"]
    engines = x["generator.num_inference_engines"]
    if sglang:
        frac = x["generator.gpu_memory_utilization"]
        weights = math.ceil(dt * P / tp)
        static = None if gpu_bytes is None else int(frac * gpu_bytes)
        kv_pool = None if static is None else static - weights - ctx
        # KV heads per TP rank: split when tp divides them, else each rank holds a replica of one head (SGLang's
        # QKVParallelLinear replicates key/value heads when tp is a multiple of their count)
        kvt = shape.kv_bytes_per_token(dt) * max(1, shape.num_kv_heads // tp) / shape.num_kv_heads
        seqs = math.ceil(x["trainer.train_batch_size"] * x["generator.n_samples_per_prompt"] / engines)
        if kv_pool is None:
            kv_detail = f"generator.gpu_memory_utilization={frac} x GPU - weights - context (GPU size unknown)"
        else:
            kv_detail = (f"generator.gpu_memory_utilization={frac} x {gib(gpu_bytes)} - weights - context: "
                         f"~{max(kv_pool, 0) / kvt:,.0f} tokens of {kvt:,.0f} B; the rollout batch needs up to "
                         f"{seqs} x {seq} = {seqs * seq:,} tokens per engine")
            if kv_pool < kvt * seq:
                errors.append(
                    f"generator.gpu_memory_utilization={frac}: the engine's {gib(static)} of the {gib(gpu_bytes)} GPU "
                    f"leaves {gib(max(kv_pool, 0))} for the KV cache after {gib(weights)} of weights, less than one "
                    f"{seq}-token sequence ({gib(kvt * seq)}); raise it")
            elif kv_pool < kvt * seqs * seq:
                notes.append(f"the KV cache holds ~{kv_pool / kvt:,.0f} tokens, fewer than the rollout batch's "
                             f"{seqs * seq:,} per engine at full length: SGLang runs the batch in waves (slower, not an error)")
        outside_key = ("engine_outside_fraction_no_graph_bytes" if x["generator.sglang.disable_cuda_graph"]
                       else "engine_outside_fraction_bytes")
        processes["engine"] = [
            LineItem("cuda_context", "CUDA context", ctx, "cuda_context_bytes (inside the fraction)"),
            LineItem("weights", f"weights, {x['generator.model_dtype']}", weights, f"{dt} B x {P:,} params / TP {tp}"),
            LineItem("kv_cache", "KV cache", kv_pool, kv_detail),
            LineItem("outside_fraction", "outside the fraction (CUDA graphs, sampling)", int(C[outside_key]), outside_key),
        ]
        if colocated:
            processes["engine"].append(LineItem("kept_asleep", "kept while asleep", int(C["engine_asleep_bytes"]), "engine_asleep_bytes"))
    else:
        notes.append("generator.backend=hf: the transformers generator's memory is not planned (a CPU backend)")

    # ---- phases
    def total(parts: Iterable[tuple[str, str]]) -> Optional[int]:
        vals = [next(it.bytes for it in processes[proc] if it.key == key) for proc, key in parts]
        return None if any(v is None for v in vals) else int(sum(vals))

    static_parts = [("trainer", "cuda_context"), ("trainer", "master_weights"), ("trainer", "adamw_state")]
    if kl:
        static_parts.append(("trainer", "reference_weights"))
    train = [*static_parts, ("trainer", "gradients"), ("trainer", "compute_copies"),
             ("trainer", "train_activations"), ("trainer", "train_logits"), ("trainer", "train_slack")]
    logprobs = [*static_parts, ("trainer", "compute_copies"), ("trainer", "forward_activations"), ("trainer", "forward_logits"),
                ("trainer", "forward_slack")]
    sync = [*static_parts, ("trainer", "weight_sync_buckets")]
    phase_parts: list[tuple[str, str, list[tuple[str, str]]]] = []
    if colocated:
        asleep = [("engine", "cuda_context"), ("engine", "kept_asleep")] if sglang else []
        if sglang:
            phase_parts.append(("rollout", "shared GPU", [("engine", "cuda_context"), ("engine", "weights"), ("engine", "kv_cache"),
                                                          ("engine", "outside_fraction"), ("trainer", "cuda_context"),
                                                          ("trainer", "kept_after_offload")]))
            phase_parts.append(("weight sync", "shared GPU", [*sync, ("engine", "cuda_context"), ("engine", "weights"),
                                                              ("engine", "kept_asleep")]))
        phase_parts += [("log-probs", "shared GPU", [*logprobs, *asleep]), ("train", "shared GPU", [*train, *asleep])]
        num_gpus = workers
    else:
        phase_parts += [("weight sync", "policy GPU", sync), ("log-probs", "policy GPU", logprobs), ("train", "policy GPU", train)]
        if sglang:
            phase_parts.append(("rollout", "engine GPU", [("engine", "cuda_context"), ("engine", "weights"),
                                                          ("engine", "kv_cache"), ("engine", "outside_fraction")]))
        num_gpus = workers + (engines * tp if sglang else 0)
    phases = [Phase(n, g, tuple(parts), total(parts)) for n, g, parts in phase_parts]
    return MemoryPlan(shape=shape, inputs=dict(x), gpu_bytes=gpu_bytes, layout="colocated" if colocated else "split",
                      num_gpus=num_gpus, processes=processes, phases=phases, notes=notes, errors=errors)


def plan_for_config(cfg: "RunConfig", gpu_bytes: Optional[int]) -> tuple[Optional[MemoryPlan], list[str]]:
    """Find the model's ``config.json`` and plan; ``(None, [note])`` when the plan cannot be made.

    No plan when the trainer runs on CPU (``trainer.device=cpu``), when the model's ``config.json`` is
    neither in a local folder nor in the Hugging Face cache, or when it cannot be read (the note says
    which). Returns the plan and notes for the user (the plan's own notes are in ``plan.notes``).
    """
    if cfg.trainer.device == "cpu":
        return None, ["memory plan: trainer.device=cpu, no GPU memory to plan"]
    path = cfg.trainer.policy.model.path
    found = find_config_json(path)
    if found is None and _looks_like_local_path(path):
        return None, [f"memory plan: no config.json in the folder trainer.policy.model.path={path}; no plan. Point "
                      "trainer.policy.model.path at a local folder holding its config.json, or at a Hugging Face model name"]
    if found is None:
        return None, [f"memory plan: no config.json for trainer.policy.model.path={path} (not a local folder and "
                      f"not in the Hugging Face cache); no plan. Download it (`hf download {path}`, or only its "
                      f"config.json for the plan: `hf download {path} config.json`; older huggingface_hub: "
                      "`huggingface-cli download`) or point trainer.policy.model.path at a local folder holding its config.json"]
    try:
        shape = ModelShape.from_config_json(found)
    except ValueError as e:
        return None, [f"memory plan: {e}; no plan"]
    return plan(cfg, shape, gpu_bytes), []


# ------------------------------------------------------------------------------------------ fit check


def _candidates(x: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Changes that lower memory, each ``(label, {key: value, ...})``, least intrusive first within each
    key; values keep the config's micro-batch and colocated-layout rules."""
    out: list[tuple[str, dict[str, Any]]] = []
    budget = x.get("trainer.max_tokens_per_microbatch")
    if budget is not None:  # the sizes have no effect: a smaller budget does (not below one whole sequence)
        seq = x["trainer.max_prompt_length"] + x["generator.sampling_params.max_new_tokens"]
        smaller = {budget // 2 ** k for k in range(1, 8) if budget // 2 ** k >= seq} | ({seq} if budget > seq else set())
        for v in sorted(smaller, reverse=True):
            out.append(("trainer.max_tokens_per_microbatch", {"trainer.max_tokens_per_microbatch": v}))
    else:
        m = x["trainer.micro_train_batch_size_per_gpu"]
        for v in range(m - 1, 0, -1):
            if _batch_rule_ok({**x, "trainer.micro_train_batch_size_per_gpu": v}):
                out.append(("trainer.micro_train_batch_size_per_gpu", {"trainer.micro_train_batch_size_per_gpu": v}))
        mf = x["trainer.micro_forward_batch_size_per_gpu"]
        for v in sorted({mf // 2 ** k for k in range(1, 12) if mf // 2 ** k >= 1}, reverse=True):
            out.append(("trainer.micro_forward_batch_size_per_gpu", {"trainer.micro_forward_batch_size_per_gpu": v}))
    if not x["trainer.gradient_checkpointing"]:
        out.append(("trainer.gradient_checkpointing", {"trainer.gradient_checkpointing": True}))
    if x["generator.backend"] == "sglang":
        frac = x["generator.gpu_memory_utilization"]
        for k in range(1, 20):
            v = round(frac - 0.05 * k, 2)
            if v < 0.05:
                break
            out.append(("generator.gpu_memory_utilization", {"generator.gpu_memory_utilization": v}))
    gpn, nodes = x["trainer.placement.policy_num_gpus_per_node"], x["trainer.placement.policy_num_nodes"]
    colo = x["trainer.placement.colocate_all"]
    for mult in (2, 4, 8):
        ch: dict[str, Any] = {}
        if gpn * mult <= 8:
            ch["trainer.placement.policy_num_gpus_per_node"] = gpn * mult
        else:
            ch["trainer.placement.policy_num_nodes"] = nodes * mult
        if colo:
            ch["generator.num_inference_engines"] = x["generator.num_inference_engines"] * mult
        trial = {**x, **ch}
        if not _batch_rule_ok(trial):  # keep the rule: shrink the micro-batch with the new worker count
            fits = [v for v in range(x["trainer.micro_train_batch_size_per_gpu"], 0, -1)
                    if _batch_rule_ok({**trial, "trainer.micro_train_batch_size_per_gpu": v})]
            if not fits:
                continue
            ch["trainer.micro_train_batch_size_per_gpu"] = fits[0]
        out.append(("more GPUs", ch))
    if colo and x["generator.backend"] == "sglang":
        out.append(("split placement", {"trainer.placement.colocate_all": False}))
    T = x["generator.sampling_params.max_new_tokens"]
    for v in sorted({T // 2 ** k for k in range(1, 5) if T // 2 ** k >= 64}, reverse=True):
        out.append(("generator.sampling_params.max_new_tokens", {"generator.sampling_params.max_new_tokens": v}))
    return out


def _changes_text(x: dict[str, Any], ch: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)
    return " ".join(f"{k}={fmt(x[k])} -> {fmt(v)}" for k, v in ch.items())


def suggestions(p: MemoryPlan, gpu_bytes: int) -> list[str]:
    """Changes that would bring the estimated peak under ``gpu_bytes``, one line per config key (or
    group of keys), each with the GiB it saves (``peak before - peak after``, by re-planning), and a
    last line with a combination when no single change is enough (greedy: the largest saving first).
    A key whose strongest change is not enough alone is listed with ``(not enough alone)``.
    """
    x, before = p.inputs, p.peak_bytes
    if before is None:
        return []
    best: dict[str, tuple[dict[str, Any], int, bool]] = {}
    for label, ch in _candidates(x):
        after = plan_from_inputs({**x, **ch}, p.shape, gpu_bytes).peak_bytes
        if after is None or after >= before:
            continue
        fits = after <= gpu_bytes
        have = best.get(label)
        if have is None or (not have[2] and (fits or after < have[1])):
            best[label] = (ch, after, fits)
    lines = []
    for label, (ch, after, fits) in best.items():
        extra = "" if fits else " (not enough alone)"
        if label == "split placement":
            n = x["generator.num_inference_engines"] * x["generator.inference_engine_tensor_parallel_size"]
            extra += f" (the engines move to {n} more GPU{'s' if n != 1 else ''})"
        if label == "generator.sampling_params.max_new_tokens":
            extra += " (shorter responses: changes what is trained)"
        lines.append(f"{_changes_text(x, ch)} saves ~{(before - after) / GiB:.1f} GiB{extra}")
    if best and not any(f for _, _, f in best.values()):
        cur, applied = dict(x), {}
        for _ in range(6):
            peak_now = plan_from_inputs(cur, p.shape, gpu_bytes).peak_bytes
            if peak_now is None or peak_now <= gpu_bytes:
                break
            options = []
            for label, ch in _candidates(cur):
                if label == "generator.sampling_params.max_new_tokens":
                    continue
                after = plan_from_inputs({**cur, **ch}, p.shape, gpu_bytes).peak_bytes
                if after is not None and after < peak_now:
                    options.append((after, ch))
            if not options:
                break
            after, ch = min(options, key=lambda o: o[0])
            cur.update(ch)
            applied.update(ch)
        final = plan_from_inputs(cur, p.shape, gpu_bytes).peak_bytes
        if applied and final is not None and final <= gpu_bytes:
            lines.append(f"together: {_changes_text(x, applied)} (peak ~{gib(final)})")
    return lines


def check_fit(p: MemoryPlan, gpu_bytes: Optional[int], allow_over: bool = False) -> Optional[tuple[str, str]]:
    """Check the plan against one GPU of ``gpu_bytes`` bytes.

    Returns None when the estimated peak is at most ``gpu x (1 - ERROR_FRACTION)`` (or when
    ``gpu_bytes`` is None: no check), else ``(level, text)``: ``("warning", ...)`` when the peak is
    within ``gpu x (1 +- ERROR_FRACTION)``; ``("error", ...)`` above it, or when the layout cannot
    work at all (``p.errors``: no room for the KV cache). An ``"error"`` names the keys that would make
    the plan fit, with the GiB each saves (:func:`suggestions`) and the override; with ``allow_over``
    it becomes a ``"warning"`` saying the check was overridden.
    """
    if gpu_bytes is None:
        return None
    if gpu_bytes != p.gpu_bytes:
        p = plan_from_inputs(p.inputs, p.shape, gpu_bytes)
    peak = p.peak
    problems = list(p.errors)
    level = None
    if peak is not None and peak.bytes > gpu_bytes * (1 + ERROR_FRACTION):
        level = "error"
    elif problems:
        level = "error"
    elif peak is not None and peak.bytes > gpu_bytes * (1 - ERROR_FRACTION):
        return ("warning", f"memory plan: the estimated peak {gib(peak.bytes)} per GPU ({peak.name}, {peak.gpu}) is within "
                           f"the estimate's +-{ERROR_FRACTION:.0%} of the GPU's {gib(gpu_bytes)}: it may not fit")
    if level is None:
        return None
    head = []
    if peak is not None and peak.bytes > gpu_bytes * (1 + ERROR_FRACTION):
        head.append(f"memory plan: the estimated peak {gib(peak.bytes)} per GPU ({peak.name}, {peak.gpu}) exceeds the "
                    f"GPU's {gib(gpu_bytes)} by more than the estimate's {ERROR_FRACTION:.0%} error")
    head += [f"memory plan: {e}" for e in problems]
    text = "; ".join(head)
    if allow_over:
        return ("warning", f"{text}; running anyway ({OVERRIDE_FLAG})")
    fixes = suggestions(p, gpu_bytes) if peak is not None and peak.bytes > gpu_bytes else []
    if fixes:
        text += ". Changes that lower the peak (saving by re-planning):\n" + "\n".join(f"  {f}" for f in fixes)
    else:
        text += "."
    return ("error", f"{text}\n{OVERRIDE_FLAG} runs anyway (the estimate may be off by {ERROR_FRACTION:.0%})")


# ------------------------------------------------------------------------------------------ rendering


def plan_as_dict(p: MemoryPlan) -> dict[str, Any]:
    """The plan as plain data for yaml/json output: bytes as integers (None: unknown), the model shape,
    the layout, line items per process, phases with their parts and totals, the peak, the stated
    error, the coefficients and the notes."""
    s = p.shape
    peak = p.peak
    return {
        "model": {"config": s.source or None, "model_type": s.model_type or None, "parameters": s.num_parameters,
                  "hidden_size": s.hidden_size, "num_layers": s.num_layers, "num_heads": s.num_heads,
                  "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "intermediate_size": s.intermediate_size,
                  "vocab_size": s.vocab_size, "tie_word_embeddings": s.tie_word_embeddings},
        "gpu_bytes": p.gpu_bytes,
        "layout": p.layout,
        "num_gpus": p.num_gpus,
        "processes": {proc: {it.key: {"label": it.label, "bytes": it.bytes, "detail": it.detail} for it in items}
                      for proc, items in p.processes.items()},
        "phases": [{"name": ph.name, "gpu": ph.gpu, "parts": [f"{a}.{b}" for a, b in ph.parts], "bytes": ph.bytes}
                   for ph in p.phases],
        "peak": None if peak is None else {"phase": peak.name, "gpu": peak.gpu, "bytes": peak.bytes,
                                           "gib": round(peak.bytes / GiB, 2)},
        "error_fraction": ERROR_FRACTION,
        "coefficients": dict(COEFFICIENTS),
        "notes": list(p.notes),
        "errors": list(p.errors),
    }


def plan_tree(p: MemoryPlan) -> "Tree":
    """A rich Tree of the plan: model, line items per process (GiB, with how each was computed), phases
    with totals (the peak marked) and notes."""
    from rich.markup import escape
    from rich.tree import Tree

    s = p.shape
    gpu = "GPU size unknown: no fit check" if p.gpu_bytes is None else f"GPU {gib(p.gpu_bytes)}"
    root = Tree(f"[bold]memory plan[/bold] ({escape(p.layout)}, {p.num_gpus} GPU{'s' if p.num_gpus != 1 else ''}, "
                f"{gpu}; estimate +-{ERROR_FRACTION:.0%})")
    root.add(f"[bold]model[/bold]: {s.num_parameters / 1e9:.2f} B parameters, {s.num_layers} layers, hidden {s.hidden_size}, "
             f"vocab {s.vocab_size:,}" + (f" [dim]({escape(s.source)})[/dim]" if s.source else ""))
    for proc, items in p.processes.items():
        node = root.add(f"[bold]{proc}[/bold] (per GPU)")
        for it in items:
            node.add(f"{escape(it.label)}: [green]{gib(it.bytes)}[/green] [dim]{escape(it.detail)}[/dim]")
    peak = p.peak
    ph_node = root.add("[bold]phases[/bold] (per GPU)")
    for ph in p.phases:
        mark = " [bold red]<- peak[/bold red]" if peak is not None and ph is peak else ""
        ph_node.add(f"{escape(ph.name)} ({escape(ph.gpu)}): [green]{gib(ph.bytes)}[/green]{mark}")
    for n in p.notes:
        root.add(f"[yellow]note[/yellow]: {escape(n)}")
    return root


def print_plan_tree(p: MemoryPlan, console: Any = None) -> None:
    """Print :func:`plan_tree` on ``console`` (a rich Console; stdout by default)."""
    from rich.console import Console

    (console or Console(soft_wrap=False)).print(plan_tree(p))
