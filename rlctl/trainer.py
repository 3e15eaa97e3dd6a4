"""The FSDP2 policy trainer: one data-parallel rank of the policy (and of the frozen reference model).

``PolicyTrainer`` loads a Hugging Face causal LM, shards it with ``torch.distributed.fsdp.fully_shard``
per decoder block (gloo on CPU, NCCL on CUDA), computes per-token log-probabilities of response
tokens (straight from the LM head's input in fp32 chunks, :mod:`rlctl.logprobs`: no [N, T, V] logits
tensor), and trains with the GRPO loss of :mod:`rlctl.grpo` over mini-batches split into micro-batches
(gradient accumulation), AdamW and gradient clipping. When colocated with a generator on the same GPU
it offloads parameters and optimizer state to CPU between phases (``offload`` / ``onload``).

It knows nothing about Ray: ``rlctl/job/actors.py`` wraps it in an actor. Every rank must call the
collective methods (``compute_logprobs`` is local, ``train_step``, ``iter_weight_buckets``,
``save_checkpoint`` are collective).

Batch layout (a dict of CPU tensors, N sequences of one rank), built by :func:`rlctl.loop.build_batch`::

    input_ids       [N, P+T] int64   left-padded prompt (P columns) + right-padded response (T columns)
    attention_mask  [N, P+T] int64   1 on real tokens
    response_mask   [N, T]   float32 1 on response tokens that enter the loss
    advantages      [N]      float32 sequence-level GRPO advantage
    old_logprobs    [N, T]   float32 (added by the loop from compute_logprobs before training)
    ref_logprobs    [N, T]   float32 (only when KL is used)
    tis_weights     [N, T]   float32 truncated importance-sampling weights (only with off_policy_correction)

Micro-batches (:meth:`PolicyTrainer._micro_batches`): sequences sorted by length, ``micro_*_batch_size_per_gpu``
at a time or, with ``trainer.max_tokens_per_microbatch``, up to that many real tokens (ranks then pad to the
same count with empty micro-batches); with ``trainer.remove_microbatch_padding`` each micro-batch runs as one
padding-free packed row (:mod:`rlctl.packing`).

Test: ``pytest tests/unit/test_trainer.py`` (a 1- and 2-rank gloo group on CPU with a tiny Llama) and
``tests/unit/test_packing.py`` (packed / token-budget micro-batches).
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from rlctl import grpo
from rlctl.packing import packed_logprobs_forward

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The list of decoder blocks of a Hugging Face causal LM (Llama, Qwen2, Mistral, ... layouts).

    Raises:
        ValueError: the model has no ``model.layers`` (the only layout rlctl shards per block).
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: rlctl shards decoder blocks of Llama-style models")
    return list(layers)


def load_and_shard(model_path: str, *, mesh, device: torch.device, param_dtype: torch.dtype | None,
                   gradient_checkpointing: bool, trainable: bool, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Load a causal LM on ``device`` and apply FSDP2 per decoder block.

    A trainable model is stored in fp32 (master weights); ``param_dtype`` (e.g. bf16 on CUDA) is its
    compute dtype through ``MixedPrecisionPolicy``, None keeps fp32 compute (CPU), and gradients are
    reduced in fp32. A frozen model (``trainable=False``, the reference model) has no optimizer to
    need fp32 master weights: it is stored directly in ``param_dtype`` (half the memory and no cast
    per all-gather), or fp32 when that is None.
    """
    from transformers import AutoModelForCausalLM

    load_dtype = torch.float32 if trainable or param_dtype is None else param_dtype
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=load_dtype)
    model.config.use_cache = False
    if gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    if param_dtype is not None and load_dtype == torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()  # fp32 compute, or a frozen model already stored in param_dtype
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def response_logits_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            response_len: int) -> torch.Tensor:
    """Logits predicting the response tokens (the full-vocabulary path; the trainer uses
    :func:`response_logprobs_forward`, which never builds them).

    Args:
        input_ids, attention_mask: [N, P+T] (left-padded prompt, right-padded response).
        response_len: T.
    Returns:
        [N, T, V] float32 logits; row t predicts ``input_ids[:, P + t]``.
    Raises:
        ValueError: a row has an empty prompt, or the model has no output embedding (LM head).

    The rows are right-packed before the forward pass (each row rotated left by its number of left
    pads: ``[prompt, response, pads]``): every real token then sits at column = position 0..len-1 and
    every pad after all of its row's real tokens, so plain causal attention is exact for every real
    token (a real token never attends to a later column) and the model runs with ``attention_mask=None``
    and default position ids (0..L-1; real tokens at 0..len-1, as with transformers ``generate`` on
    left-padded prompts, so the trainer's and the ``hf`` generator's log-probs stay equal). The pads
    compute garbage that never reaches the loss. Without a mask tensor SDPA runs its causal kernels
    (flash attention on CUDA), the kernel of the bare-rate benchmark; with a mask it ran cuDNN attention
    (torch 2.11's default for a masked call on H100 / H200: NaN dQ at lengths 64 mod 128,
    pytorch/pytorch#196678) or, with cuDNN excluded, the memory-efficient kernel, under which the H100
    runs of 2026-12-07 stopped learning the answer format (docs/benchmarks.md 5d). Left padding would
    also leave pad queries attending to nothing, which some kernels turn into NaN activations and
    ``0 * NaN`` into NaN weight gradients.

    Right-packing puts each row's response at its own column, so the rows' response positions are
    picked from the final hidden states ([N, T, H]) by a forward pre-hook on the LM head, which then
    computes exactly N x T logits: no logits for prompt or pad positions and no gather over the
    vocabulary (V is 151,936 for Qwen2.5 against H = 896; the logits are the largest tensors of the
    step). Only the last ``T + max_left_pad + 1`` hidden positions reach the head (``logits_to_keep``).
    """
    return _packed_head_forward(model, input_ids, attention_mask, response_len, None, "V",
                                "response_logits_forward").float()


def response_logprobs_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              response_len: int, temperature: float, *, with_entropy: bool = False,
                              entropy_grad: bool = False,
                              chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) of the response tokens, without any [N, T, V] tensor.

    The same right-packed forward and response-position picking as :func:`response_logits_forward`
    (read its docstring), but for the duration of the call the LM head's ``forward`` is replaced by
    :func:`rlctl.logprobs.linear_logprobs` on the picked hidden states [N, T, H], with the response
    tokens as labels: the head still runs inside the model's (FSDP2 root's) forward, where FSDP2 has
    unsharded its weight (bf16 under ``MixedPrecisionPolicy(param_dtype=bf16)``), and the weight's
    gradient flows back to the FSDP2 parameter. Tied and untied heads both work (the head reads its
    ``weight`` at call time). The log-softmax runs in fp32 chunks of
    :data:`rlctl.logprobs.CHUNK_POSITIONS` positions (the backward recomputes each chunk's logits).

    Args:
        model: a Hugging Face causal LM whose forward calls ``get_output_embeddings()`` (a linear head,
            ``weight`` [V, H], optional ``bias`` [V]) on the final hidden states and returns that as
            ``logits`` unchanged (Llama, Qwen2, Mistral; not Gemma's soft-capped logits).
        input_ids, attention_mask: [N, P+T] (left-padded prompt, right-padded response).
        response_len: T.
        temperature: sampling temperature; logits are divided by it; 0 (greedy) means 1.
        with_entropy: also return the entropy (nats) of ``softmax(logits / temperature)``.
        entropy_grad: the entropy is differentiable (an entropy loss); else a detached metric.
        chunk_size: positions per chunk; None: :data:`rlctl.logprobs.CHUNK_POSITIONS`.
    Returns:
        ``(logp, entropy)``: [N, T] float32 each (entropy None without ``with_entropy``); position t
        is the log-prob of ``input_ids[:, P + t]``.
    Raises:
        ValueError: a row has an empty prompt, the model has no output embedding, or the head has no
            2-D ``weight``.
        RuntimeError: the model did not return the head's output as its ``logits``.
    """
    from rlctl.logprobs import CHUNK_POSITIONS, linear_logprobs

    t = response_len
    labels = input_ids[:, input_ids.shape[1] - t:]  # [N, T]: the response tokens
    chunk = CHUNK_POSITIONS if chunk_size is None else chunk_size

    def head_forward(head, hidden):  # hidden [N, T, H] -> [N, T, 1 or 2] (log-prob, entropy)
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"response_logprobs_forward: the LM head {type(head).__name__} has no 2-D weight "
                             "(only linear heads are supported)")
        logp, ent = linear_logprobs(hidden, weight, labels.to(hidden.device), bias=getattr(head, "bias", None),
                                    temperature=temperature, with_entropy=with_entropy,
                                    entropy_grad=entropy_grad, chunk_size=chunk)
        # a new tensor, not a view: FSDP2 hooks the root's outputs for its pre-backward all-gather
        return torch.stack((logp, ent) if ent is not None else (logp,), -1)

    out = _packed_head_forward(model, input_ids, attention_mask, t, head_forward, "2" if with_entropy else "1",
                               "response_logprobs_forward")
    if not with_entropy:
        return out[..., 0], None
    # stacked with logp the entropy column requires grad even as a metric; its gradient is dropped anyway
    return out[..., 0], (out[..., 1] if entropy_grad else out[..., 1].detach())


def _packed_head_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         response_len: int, head_forward, width: str, caller: str) -> torch.Tensor:
    """Right-packed forward whose LM head sees only the response positions (see
    :func:`response_logits_forward`); ``head_forward(head, hidden [N, T, H])``, if given, replaces the
    head's own forward during the call. Returns the model's ``logits`` [N, T, width]; raises as
    :func:`response_logprobs_forward`, errors prefixed with ``caller``."""
    n, length = input_ids.shape
    t = response_len
    left = (attention_mask[:, :length - t] == 0).sum(1)  # [N] left pads (contiguous, from build_batch)
    cols = (torch.arange(length, device=input_ids.device)[None, :] + left[:, None]) % length
    ids = input_ids.gather(1, cols)  # right-packed: [prompt, response, pads] per row
    left_max = int(left.max()) if n else 0
    left_min = int(left.min()) if n else 0
    if left_max >= length - t:
        raise ValueError(f"{caller}: a row has an empty prompt (no token before its response)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{caller}: {type(model).__name__} has no output embedding (LM head)")

    def pick_response_positions(_module, args):
        hidden = args[0]  # [N, K, H]: the last K positions of the packed rows
        k = hidden.shape[1]
        if k < t + left_max + 1:
            raise RuntimeError(f"{caller}: the LM head got {k} positions, fewer than the "
                               f"{t + left_max + 1} asked for with logits_to_keep")
        # response token j of row i sits at packed column length - t + j - left_i, predicted by the hidden
        # state one column earlier, i.e. index k - t - 1 - left_i + j of the last k positions
        if left_min == left_max:  # same offset for every row (always for a 1-row micro-batch): a view
            start = k - t - 1 - left_max
            return (hidden[:, start:start + t], *args[1:])
        idx = (k - t - 1 - left)[:, None] + torch.arange(t, device=hidden.device)[None, :]  # [N, T]
        return (hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1])), *args[1:])

    from rlctl.logprobs import head_replaced

    with head_replaced(head, pick_response_positions, head_forward):
        # no mask, no position ids: causal attention over right-packed rows (see response_logits_forward)
        out = model(input_ids=ids, attention_mask=None, use_cache=False, logits_to_keep=t + left_max + 1)
    if out.logits.shape[:2] != (n, t) or (head_forward is not None and out.logits.shape[2:] != (int(width),)):
        raise RuntimeError(f"{caller}: the LM head gave logits of shape {tuple(out.logits.shape)}, "
                           f"expected ({n}, {t}, {width}): {type(model).__name__} does not call get_output_embeddings() "
                           "on the final hidden states")
    return out.logits


# what _optimizer_step sums on the device per micro-batch (the last entry: clipped response tokens)
_STEP_SUMS = ("policy/pg_loss", "policy/kl", "policy/entropy", "policy/loss", "clip_tokens")

RESPONSE_KEYS = ("response_mask", "old_logprobs", "ref_logprobs", "tis_weights")  # [N, T] tensors aligned with the response


def check_batch_layout(attention_mask: torch.Tensor, response_len: int) -> None:
    """Refuse a batch the trainer's unmasked forward would get wrong: every row must be ``[left pads, prompt]`` in
    its first P columns and ``[response, right pads]`` in its last T (``build_batch``'s layout), so that rotating
    out the left pads leaves every pad after every real token (:func:`response_logits_forward`).

    Args:
        attention_mask: [N, P+T] 0/1 (CPU).
        response_len: T.
    Raises:
        ValueError: a row with a pad between real tokens (the message names the first such row).
    """
    p_cols = attention_mask.shape[1] - response_len
    a = attention_mask.bool()
    bad = (a[:, :p_cols][:, 1:] < a[:, :p_cols][:, :-1]).any(1) | (a[:, p_cols:][:, 1:] > a[:, p_cols:][:, :-1]).any(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"trainer batch row {row}: attention_mask {a[row].int().tolist()} has a pad between real "
                         "tokens; the trainer needs left-padded prompts and right-padded responses (rlctl.loop.build_batch)")


def trim_padding(mb: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Drop the padding columns every sequence of a micro-batch shares, so the forward pass only
    computes over the micro-batch's own longest prompt and response (exact: the forward right-packs the rows, so
    padded positions are never attended, and they never enter the loss).

    Args:
        mb: a micro-batch in the module's batch layout: ``input_ids`` / ``attention_mask`` [n, P+T],
            ``response_mask`` / ``old_logprobs`` / ``ref_logprobs`` [n, T], others (``advantages`` [n]) kept.
    Returns:
        ``(trimmed, T)``: ``input_ids`` / ``attention_mask`` [n, P'+T'] with the leading all-padding
        prompt columns and trailing all-padding response columns removed, response tensors [n, T'],
        T' >= 1; and the original response width T (to pad per-token outputs back to [n, T]).
    """
    attn = mb["attention_mask"]
    T = mb["response_mask"].shape[1]
    P = attn.shape[1] - T
    used = attn.bool().any(0).nonzero().flatten()
    first = min(int(used[0]), P) if used.numel() else P
    last = max(int(used[-1]) + 1, P + 1) if used.numel() else P + 1
    t_keep = last - P
    out = {}
    for k, v in mb.items():
        if k in ("input_ids", "attention_mask"):
            out[k] = v[:, first:last]
        elif k in RESPONSE_KEYS:
            out[k] = v[:, :t_keep]
        else:
            out[k] = v
    return out, T


def trainer_attention(device: torch.device):
    """The context every trainer forward (log-probs and training, and so the training backward) runs in: on CUDA,
    SDPA may pick flash, memory-efficient or math attention but not cuDNN's; elsewhere no change
    (``contextlib.nullcontext``).

    Why: torch 2.11+ on H100 / H200 picks cuDNN attention by default for a masked SDPA call, and (1) its backward
    returns NaN in dQ when the sequence length is 64 modulo 128 and a query row's log-sum-exp is below ln(FLT_MAX)
    ~ -88.7 (pytorch/pytorch#196678; huggingface/trl#7181 hit it through a Qwen2.5 attention head whose logits all sit
    near -120). A trimmed micro-batch has that length about once in 128 micro-batches: the 1-in-10 to 1-in-20
    non-finite optimizer steps of the Qwen2.5 GPU runs, never seen in random-weight probes. (2) cuDNN attention
    builds and caches an execution plan per input shape; every trimmed micro-batch of a real run has a new length,
    which is the suspected reason (not yet measured) why the trainer ran 2-2.5x slower per token inside a real run
    than in a probe that repeats one batch (docs/benchmarks.md 5c).

    Since 2026-12-07 the padded forward passes no mask tensor (:func:`response_logits_forward`), so SDPA runs its
    causal flash kernel there; the mask, and with it the choice this context makes among masked kernels, is left
    to the packed forward (``trainer.remove_microbatch_padding``: a block-diagonal mask) and to sliding-window
    layers longer than their window (Mistral; Qwen2 with ``use_sliding_window``, off in Qwen2.5's configs), which
    transformers gives a mask: those run the memory-efficient kernel, not yet checked on a GPU
    (``tests/gpu/test_trainer_gradient.py`` checks the padded path).

    The backward passes run under it too: with gradient checkpointing each layer's forward (attention included) is
    recomputed inside ``backward()``, outside the forward's ``with`` block. The flags it sets are process-wide, so
    autograd's device threads see them.
    """
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


OFFLOADED_RESERVE_LIMIT_BYTES = 1 << 30  # 1 GiB: CUDA memory a colocated trainer may keep reserved while offloaded


class HostBuffers:
    """Host (CPU) tensors allocated once per key and reused by every offload, so that moving the
    trainer's state off the GPU neither allocates host memory each cycle nor copies from pageable
    memory. With ``pin=True`` (CUDA) they are page-locked and the copies are non-blocking: the caller
    synchronizes the stream before reading them.

    Test: ``tests/unit/test_trainer.py::test_host_buffers_are_allocated_once_and_reused`` (``pin=False``).
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._bufs: dict[Any, torch.Tensor] = {}

    def copy_in(self, key: Any, t: torch.Tensor) -> torch.Tensor:
        """Copy ``t`` (any shape, dtype, device) into the host buffer of ``key`` and return the buffer;
        allocated on first use and again only if ``t``'s shape or dtype changed."""
        buf = self._bufs.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin)
            self._bufs[key] = buf
        buf.copy_(t, non_blocking=self.pin)
        return buf

    def wait(self) -> None:
        """Block until every :meth:`copy_in` issued so far has landed (pinned: the copies are
        non-blocking on the current CUDA stream; pageable: they are synchronous, nothing to wait for)."""
        if self.pin:
            torch.cuda.current_stream().synchronize()

    @property
    def nbytes(self) -> int:
        """Host memory held, bytes."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's data: a DTensor's local shard, else ``t``."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def to_host_buffer(buffers: HostBuffers, key: Any, t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into the host buffer of ``key``: a plain tensor, or for a DTensor (FSDP2 parameter
    or optimizer state) a DTensor of the same spec (mesh, placements, global shape) whose local shard is
    the buffer.

    The DTensor is built from ``t``'s spec directly, as FSDP2's own CPU offload does
    (``_fsdp_common._from_local_no_grad``): ``DTensor.from_local`` moves a local tensor to the mesh's
    device type, so on a CUDA mesh it copied every host buffer straight back to the GPU (measured on an
    H200: the offload then freed nothing, 6.55 GiB of a 0.5B model's shards and AdamW state stayed).
    """
    from torch.distributed.tensor import DTensor

    buf = buffers.copy_in(key, _local(t))
    if isinstance(t, DTensor):
        return DTensor(buf, t._spec, requires_grad=False)
    return buf


def move_module_to_host(model: torch.nn.Module, buffers: HostBuffers) -> None:
    """Move every parameter and buffer of ``model`` (an FSDP2 module: parameters are DTensors, this
    rank's shard is moved) into ``buffers`` (keyed by traversal order, which is fixed for a model), in
    place: the ``Parameter`` objects stay the same, so an optimizer keeps pointing at them. Gradients
    must be None (they would be moved as new tensors). Inverse: :func:`move_module_to_device`.

    Two passes: every tensor is copied into its host buffer, :meth:`HostBuffers.wait` lets the
    (non-blocking, pinned) copies land, and only then does ``model._apply`` swap the host tensors in.
    FSDP2's ``_apply`` re-pads an unevenly sharded parameter (``FSDPParam.reset_sharded_param``: a rank
    whose shard is shorter than the padded size gets a new tensor copied from the swapped-in one) right
    away, so swapping before the copies landed would pad stale host memory (garbage weights on that rank).
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # sharded parameters registered (an unsharded root after a forward is not)
        if isinstance(m, FSDPModule):
            m.reshard()
    host: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and id(t) not in host:  # a tied weight (embeddings / LM head) once
                host[id(t)] = to_host_buffer(buffers, len(host), t)
    buffers.wait()
    model._apply(lambda t: host.get(id(t), t))


def move_module_to_device(model: torch.nn.Module, device: torch.device) -> None:
    """Copy ``model``'s parameters and buffers to ``device`` (non-blocking from pinned host buffers;
    the host buffers stay allocated for the next :func:`move_module_to_host`)."""
    seen: dict[int, torch.Tensor] = {}

    def to_device(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in seen:
            seen[id(t)] = t.to(device, non_blocking=True)
        return seen[id(t)]

    model._apply(to_device)


class PolicyTrainer:
    """One rank of the FSDP2 policy; see the module docstring for the batch layout.

    Args:
        model_path: Hugging Face hub name or local folder.
        tcfg: the ``trainer`` section of the run config (``rlctl.config``).
        algo: ``trainer.algorithm``.
        rank, world_size: this rank in the data-parallel group (process group already initialized by
            :meth:`init_process_group`).
        device: ``"cpu"`` or ``"cuda"``.
        max_response_len: ``generator.sampling_params.max_new_tokens`` (tokens), the Dr. GRPO constant.
    """

    _computed_tokens = 0  # training forward tokens of the current train_step (see _micro_batches)

    def __init__(self, model_path: str, tcfg: Any, *, rank: int, world_size: int, device: str,
                 max_response_len: int, compute_dtype: str = "bfloat16", colocated: bool = True) -> None:
        self.rank, self.world_size = rank, world_size
        self.tcfg, self.algo = tcfg, tcfg.algorithm
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.max_response_len = max_response_len
        self.colocated = colocated and self.device.type == "cuda"
        self._seed_everything(tcfg.seed)
        self.mesh = init_device_mesh(self.device.type, (world_size,))
        param_dtype = DTYPES[compute_dtype] if self.device.type == "cuda" else None
        fsdp = tcfg.policy.fsdp_config
        self.model = load_and_shard(model_path, mesh=self.mesh, device=self.device, param_dtype=param_dtype,
                                    gradient_checkpointing=tcfg.gradient_checkpointing, trainable=True,
                                    reshard_after_forward=fsdp.reshard_after_forward)
        self.model.train()
        opt = tcfg.policy.optimizer_config
        # CUDA: the fused kernel (one launch for all parameters; measured 7 ms vs 30 ms per step with
        # foreach=False). CPU (gloo, DTensor parameters): the multi-tensor foreach path
        # (tests/unit/test_trainer.py exercises it).
        kind = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr, betas=tuple(opt.adam_betas),
                                           weight_decay=opt.weight_decay, **kind)
        self.scheduler = make_scheduler(self.optimizer, tcfg)
        self.ref_model = None
        if self.algo.use_kl_loss:
            self.ref_model = load_and_shard(model_path, mesh=self.mesh, device=self.device, param_dtype=param_dtype,
                                            gradient_checkpointing=False, trainable=False)
        if self.device.type == "cuda":
            # load_and_shard put each whole model on this GPU before FSDP2 copied out the shards: return
            # those freed blocks (a colocated engine built after this would see them as taken)
            torch.cuda.empty_cache()
        self.global_step = 0
        # where a non-finite optimizer step's diagnosis is written (the Ray actor sets <run dir>/nonfinite)
        self.diagnosis_dir: Path | None = None
        self.bad_steps_in_a_row = 0
        # SkyRL's trainer.policy.optimizer_config.offload_after_step: with colocation on CUDA, the
        # optimizer state leaves the GPU after each step only when true (parameters always do)
        self.offload_optimizer = bool(opt.offload_after_step)
        pin = self.device.type == "cuda"
        self._host = {"policy": HostBuffers(pin), "ref": HostBuffers(pin), "optimizer": HostBuffers(pin)}
        self.offloaded = False
        self._opt_offloaded: list[tuple[int, str]] = []  # (state index, key) moved by the last offload
        self.reserved_bytes_offloaded = 0  # torch.cuda.memory_reserved() after the last offload
        self.offload_error: str | None = None  # the first offload over OFFLOADED_RESERVE_LIMIT_BYTES, said once

    # ------------------------------------------------------------------ setup
    @staticmethod
    def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, device: str,
                           timeout_s: float = 600.0) -> None:
        """Join the trainer's data-parallel group (gloo on CPU, NCCL on CUDA). Idempotent."""
        if dist.is_initialized():
            return
        from datetime import timedelta

        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(0)  # Ray exposes exactly the bundle's GPU as device 0
        dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ forward
    def _logprobs_entropy(self, model, mb: dict[str, torch.Tensor], temperature: float, with_entropy: bool):
        """Log-probs [n, T'] fp32 (and entropy [n, T'] fp32 or None) of a trimmed micro-batch's response
        tokens, from :func:`response_logprobs_forward` (no [n, T', V] tensor). The entropy is
        differentiable only with ``trainer.algorithm.use_entropy_loss``; otherwise it is a metric. Runs under
        :func:`trainer_attention` (the attention kernel of a training forward is its backward's too)."""
        T = mb["response_mask"].shape[1]
        forward = packed_logprobs_forward if self._packed else response_logprobs_forward
        with trainer_attention(self.device):
            return forward(model, mb["input_ids"].to(self.device), mb["attention_mask"].to(self.device),
                           T, temperature, with_entropy=with_entropy, entropy_grad=bool(self.algo.use_entropy_loss))

    @property
    def _packed(self) -> bool:
        """``trainer.remove_microbatch_padding``."""
        return bool(self.tcfg.remove_microbatch_padding)

    def _micro_batches(self, batch: dict[str, torch.Tensor], size: int,
                       train: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Yield ``(idx, micro_batch)``, each micro-batch trimmed by :func:`trim_padding` and planned by
        :func:`rlctl.packing.plan_micro_batches` (similar lengths together): ``size`` sequences each, or up to
        ``trainer.max_tokens_per_microbatch`` tokens each when that is set (the tokens the forward runs: padding
        included after trimming, or real tokens when packed; a longer sequence runs alone).

        With a token budget the ranks may plan different numbers of micro-batches; the count is
        all-reduced (MAX) over the data-parallel group and the short ranks then yield
        :func:`rlctl.packing.empty_micro_batch` micro-batches (``idx`` empty [0]) that add nothing to the
        loss, so every rank runs the same number of forward/backward passes (FSDP2 collectives).
        ``train``: add each micro-batch's forward tokens (:func:`rlctl.packing.computed_tokens`) to
        ``self._computed_tokens``.
        """
        from rlctl.packing import computed_tokens, empty_micro_batch, plan_micro_batches

        max_tokens = self.tcfg.max_tokens_per_microbatch
        attn = batch["attention_mask"]
        check_batch_layout(attn, batch["response_mask"].shape[1])
        widths = None
        if max_tokens is not None and not self._packed:  # the budget bounds the padded forward's tokens
            p_cols = attn.shape[1] - batch["response_mask"].shape[1]
            widths = (attn[:, :p_cols].sum(1), attn[:, p_cols:].sum(1))
        plan = plan_micro_batches(attn.sum(1), size, max_tokens, widths)
        target = len(plan)
        if max_tokens is not None and self.world_size > 1:
            count = torch.tensor([target], dtype=torch.int64, device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            target = int(count.item())
        micro_batches = ((idx, trim_padding({k: v[idx] for k, v in batch.items() if isinstance(v, torch.Tensor)})[0])
                         for idx in plan)
        empty = (torch.zeros(0, dtype=torch.int64), empty_micro_batch(batch, RESPONSE_KEYS))
        for idx, mb in itertools.chain(micro_batches, itertools.repeat(empty, target - len(plan))):
            if train:
                self._computed_tokens += computed_tokens(mb, self._packed)
            yield idx, mb

    @torch.no_grad()
    def compute_logprobs(self, batch: dict[str, torch.Tensor], temperature: float, which: str = "policy") -> torch.Tensor:
        """Per-token log-probabilities of the response tokens under the policy or the reference.

        Args:
            batch: see module docstring (``input_ids``, ``attention_mask``, ``response_mask``).
            temperature: the rollout temperature; logits are divided by it (SGLang returns
                temperature-scaled log-probs); 0 means greedy and leaves logits unscaled.
            which: ``"policy"`` or ``"ref"``.
        Returns:
            [N, T] float32 on CPU (0 where ``response_mask`` is 0 is not guaranteed; mask it).
        """
        model = self.model if which == "policy" else self.ref_model
        if model is None:
            raise RuntimeError("reference log-probs asked for, but trainer.algorithm.use_kl_loss=false")
        out = torch.zeros(batch["response_mask"].shape)
        # similar lengths per micro-batch, less padding
        for idx, mb in self._micro_batches(batch, self.tcfg.micro_forward_batch_size_per_gpu):
            logp, _ = self._logprobs_entropy(model, mb, temperature, with_entropy=False)
            if idx.numel():  # not a rank-padding empty micro-batch
                out[idx, :logp.shape[1]] = logp.cpu()
        return out

    # ------------------------------------------------------------------ train
    def train_step(self, batch: dict[str, torch.Tensor], temperature: float, mini_batch_size: int) -> dict[str, float]:
        """GRPO update on this rank's share of one training batch.

        Args:
            batch: N sequences (module docstring), with ``old_logprobs`` and, if KL is on, ``ref_logprobs``.
            temperature: rollout temperature (logits are divided by it).
            mini_batch_size: sequences per optimizer step on this rank
                (``policy_mini_batch_size * n_samples_per_prompt / world_size``).
        Returns:
            Metrics averaged over optimizer steps: ``policy/loss``, ``policy/pg_loss``, ``policy/kl``,
            ``policy/entropy``, ``policy/clip_fraction``, ``policy/grad_norm``, ``policy/lr``,
            ``policy/skipped_steps`` (non-finite loss or grad norm; the update is skipped);
            :meth:`memory_metrics` (bytes; 0 on CPU); and
            ``train/computed_tokens``: tokens this rank's training forward passes processed per update
            epoch, padding and rank-padding empty micro-batches included (a per-rank count: the
            ``TrainerGroup`` sums it over ranks, to compare with the loop's ``train/tokens``).
        Raises:
            RuntimeError: ``trainer.max_bad_steps`` non-finite optimizer steps in a row.
        """
        tcfg = self.tcfg
        n = batch["input_ids"].shape[0]
        micro = tcfg.micro_train_batch_size_per_gpu
        sums: dict[str, float] = {}
        count = 0
        skipped = 0
        self._computed_tokens = 0
        for _epoch in range(tcfg.update_epochs_per_batch):
            for mstart in range(0, n, mini_batch_size):
                mini = {k: v[mstart:mstart + mini_batch_size] for k, v in batch.items()}
                lr = self.optimizer.param_groups[0]["lr"]  # the learning rate of this optimizer step
                m = self._optimizer_step(mini, temperature, micro)
                if m.pop("skipped"):
                    skipped += 1
                else:  # the schedule counts applied optimizer steps
                    self.scheduler.step()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        metrics["policy/skipped_steps"] = float(skipped)
        if self.ref_model is None:  # no KL term: no policy/kl metric (a flat 0 curve read as "KL measured")
            metrics.pop("policy/kl", None)
        metrics["policy/lr"] = lr
        metrics["train/computed_tokens"] = float(self._computed_tokens) / tcfg.update_epochs_per_batch
        metrics.update(self.memory_metrics())
        if self.device.type == "cuda" and not self.colocated:
            torch.cuda.reset_peak_memory_stats()  # colocated: reset by the next step's onload
        self.global_step += 1
        return metrics

    def _to_device(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A micro-batch's tensors on the trainer's device (through pinned memory, non-blocking, on CUDA)."""
        if self.device.type != "cuda":
            return mb
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in mb.items()}

    def _global_counts(self, mini: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Valid response tokens and sequences of the *global* mini-batch: this rank's counts summed over
        the data-parallel group (collective). Returns ``(num_tokens, num_sequences)``."""
        counts = torch.tensor([float(mini["response_mask"].sum()), float(mini["input_ids"].shape[0])],
                              dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(counts)
        num_tokens, num_seqs = counts.tolist()
        return num_tokens, int(num_seqs)

    def _optimizer_step(self, mini: dict[str, torch.Tensor], temperature: float, micro: int) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch (collective: every rank calls it with
        the same number of micro-batches).

        The loss is the GRPO objective of the *global* mini-batch (all ranks' sequences): every
        :func:`grpo.masked_reduce` divides by the global valid-token count (``token_mean``) or sequence
        count (``sequence_mean``, ``seq_mean_token_sum_norm``), so each rank's loss is its share of one
        global sum and the global gradient is the SUM over ranks of the ranks' gradients. FSDP2 reduces
        gradients with an AVG over the group, so each rank back-propagates ``world_size * loss``: the
        reduced gradient is then ``(1/W) * sum_r W * grad_r = sum_r grad_r``. (The alternative,
        ``set_gradient_divide_factor(1.0)`` on every FSDP module, reduces with ``PREMUL_SUM``, which gloo
        lacks.) ``clip_grad_norm_`` runs after that reduction, so it clips the global gradient. Reported
        loss metrics are summed over ranks, i.e. means over the global mini-batch.

        Returns: per-step metrics (floats) and ``skipped`` (the update was skipped: non-finite loss on
        some rank or non-finite grad norm).
        """
        algo = self.algo
        num_tokens, num_seqs = self._global_counts(mini)
        reduce_kw = {"num_sequences": num_seqs, "num_tokens": num_tokens, "max_response_len": self.max_response_len}
        # the loss is a sum over micro-batches normalized by mini-batch totals, so their order and
        # composition do not matter: group sequences of similar length and trim the shared padding (or pack
        # them: trainer.remove_microbatch_padding). All micro-batches go to the device before the first forward,
        # so the copies' waits all fall here.
        mbs = [self._to_device(mb) for _, mb in self._micro_batches(mini, micro, train=True)]
        # this rank's shares of pg_loss, kl, entropy, loss and clipped-token count, accumulated on the
        # device: no host-device sync per micro-batch, one read per optimizer step
        acc = torch.zeros(len(_STEP_SUMS), dtype=torch.float32, device=self.device)
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for mb in mbs:
            mask = mb["response_mask"]
            logp, ent = self._logprobs_entropy(self.model, mb, temperature, with_entropy=True)
            pg_loss, pg_m = grpo.policy_loss(
                logp, mb["old_logprobs"], mb["advantages"], mask,
                eps_clip_low=algo.eps_clip_low, eps_clip_high=algo.eps_clip_high, loss_type=algo.policy_loss_type,
                token_weights=mb.get("tis_weights"),  # already on the device (_to_device)
                clip_ratio_c=algo.clip_ratio_c, loss_reduction=algo.loss_reduction, metrics_as_tensors=True,
                **reduce_kw)
            loss = pg_loss
            kl = zero
            if self.ref_model is not None:
                kl_tok = grpo.kl_penalty(logp, mb["ref_logprobs"], algo.kl_estimator_type)
                kl = grpo.masked_reduce(kl_tok, mask, algo.loss_reduction, **reduce_kw)
                loss = loss + algo.kl_loss_coef * kl
            ent_red = grpo.masked_reduce(ent, mask, algo.loss_reduction, **reduce_kw)
            if algo.use_entropy_loss:
                loss = loss - algo.entropy_loss_coef * ent_red
            with trainer_attention(self.device):  # gradient checkpointing re-runs the attention forward in here
                (loss * self.world_size).backward()  # FSDP2 averages over ranks: see the docstring
            # clip_fraction is over this micro-batch's valid tokens: back to a token count
            acc += torch.stack([pg_loss.detach(), kl.detach(), ent_red.detach(), loss.detach(),
                                pg_m["clip_fraction"] * mask.sum()]).float()
        # this rank's shares -> global mini-batch values; a non-finite loss on any rank makes the sum
        # non-finite, so every rank agrees on skipping
        if self.world_size > 1:
            dist.all_reduce(acc)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.policy.optimizer_config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # the step's one device -> host read: the sums and the (global) grad norm together
        *vals, clip_tokens, grad_norm = torch.cat([acc.double(), grad_norm.detach().reshape(1).double()]).tolist()
        totals = dict(zip(_STEP_SUMS[:-1], vals))
        finite = math.isfinite(grad_norm) and math.isfinite(totals["policy/loss"])
        if finite:
            self.optimizer.step()
            self.bad_steps_in_a_row = 0
        else:
            self.bad_steps_in_a_row += 1
            totals["policy/nonfinite_diagnosis"] = self._diagnose_nonfinite(mbs, temperature, reduce_kw)
            if self.bad_steps_in_a_row >= self.tcfg.max_bad_steps:
                self.optimizer.zero_grad(set_to_none=True)
                raise RuntimeError(
                    f"{self.bad_steps_in_a_row} optimizer steps in a row had a non-finite loss or grad norm "
                    f"(loss={totals['policy/loss']}, grad_norm={grad_norm}); stopping (trainer.max_bad_steps="
                    f"{self.tcfg.max_bad_steps}). The last checkpoint is intact; lower "
                    "trainer.policy.optimizer_config.lr or check the rewards.")
        self.optimizer.zero_grad(set_to_none=True)
        totals["policy/grad_norm"] = grad_norm
        totals["policy/clip_fraction"] = clip_tokens / max(num_tokens, 1.0)
        totals["skipped"] = not finite
        return totals

    def _diagnose_nonfinite(self, mbs: list[dict[str, torch.Tensor]], temperature: float, reduce_kw: dict) -> float:
        """Find where a non-finite optimizer step came from: re-run its micro-batches one at a time (collective:
        every rank runs this, since all ranks agree the step is non-finite) with a forward hook on every module
        that records the first module whose output holds a NaN/Inf, then check the log-probs, the loss and,
        after each micro-batch's backward, the parameter gradients (this rank's shards, in module order).

        Writes ``<diagnosis_dir>/step<S>_rank<R>.json`` (what was found, per micro-batch: the first non-finite
        module output, the log-prob / old log-prob / advantage ranges, the loss, the first parameters with
        non-finite gradients) and ``step<S>_rank<R>_mb<k>.pt`` (the first offending micro-batch's tensors, on the
        CPU, to reproduce it). Gradients are zeroed afterwards: the step stays skipped.

        Returns: 1.0 when something non-finite was located on this rank, else 0.0 (the metric
        ``policy/nonfinite_diagnosis``, averaged over ranks by the trainer group).
        """
        import json

        found: dict[str, Any] = {"step": self.global_step + 1, "rank": self.rank, "micro_batches": []}
        first_fwd: list[str] = []

        def hook(name):
            def check(_module, _inputs, output):
                outs = output if isinstance(output, (tuple, list)) else (output,)
                for o in outs:
                    if isinstance(o, torch.Tensor) and o.is_floating_point() and not first_fwd \
                            and not bool(torch.isfinite(o).all()):
                        first_fwd.append(f"{name or type(_module).__name__} ({type(_module).__name__}, "
                                         f"shape {tuple(o.shape)}, dtype {o.dtype})")
            return check

        handles = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules()]
        algo = self.algo
        saved = None
        try:
            for k, mb in enumerate(mbs):
                first_fwd.clear()
                self.optimizer.zero_grad(set_to_none=True)
                mask = mb["response_mask"]
                # the entropy too, as the training forward computes it (same kernels); only log-probs are checked
                logp, _entropy = self._logprobs_entropy(self.model, mb, temperature, with_entropy=True)
                pg_loss, _ = grpo.policy_loss(
                    logp, mb["old_logprobs"], mb["advantages"], mask, eps_clip_low=algo.eps_clip_low,
                    eps_clip_high=algo.eps_clip_high, loss_type=algo.policy_loss_type, clip_ratio_c=algo.clip_ratio_c,
                    loss_reduction=algo.loss_reduction, **reduce_kw)
                with trainer_attention(self.device):
                    (pg_loss * self.world_size).backward()
                valid = mask != 0
                bad_grads = [n for n, prm in self.model.named_parameters()
                             if prm.grad is not None and not bool(torch.isfinite(_local(prm.grad)).all())]

                def rng(t, valid=valid):
                    v = t[valid] if t.shape == valid.shape else t
                    return [float(v.min()), float(v.max())] if v.numel() else None
                entry = {"micro_batch": k, "sequences": int(mask.shape[0]), "response_tokens": int(valid.sum()),
                         # the attention's sequence length: the trimmed row, or the packed row's real tokens
                         "sequence_length": int(mb["attention_mask"].sum()) if self._packed else int(mb["input_ids"].shape[-1]),
                         "first_nonfinite_forward_output": first_fwd[0] if first_fwd else None,
                         "logprobs_finite": bool(torch.isfinite(logp[valid]).all()),
                         "logprobs_range": rng(logp.detach()), "old_logprobs_range": rng(mb["old_logprobs"]),
                         "advantages_range": rng(mb["advantages"]), "pg_loss": float(pg_loss.detach()),
                         "nonfinite_grad_params": bad_grads[:8], "nonfinite_grad_param_count": len(bad_grads)}
                found["micro_batches"].append(entry)
                bad = entry["first_nonfinite_forward_output"] or bad_grads or not entry["logprobs_finite"] \
                    or not math.isfinite(entry["pg_loss"])
                if bad and saved is None:
                    saved = k
                    found["first_bad_micro_batch"] = k
                    if self.diagnosis_dir is not None:
                        self.diagnosis_dir.mkdir(parents=True, exist_ok=True)
                        torch.save({key: v.detach().cpu() for key, v in mb.items()},
                                   self.diagnosis_dir / f"step{found['step']}_rank{self.rank}_mb{k}.pt")
        finally:
            for h in handles:
                h.remove()
            self.optimizer.zero_grad(set_to_none=True)
        if self.diagnosis_dir is not None:
            self.diagnosis_dir.mkdir(parents=True, exist_ok=True)
            path = self.diagnosis_dir / f"step{found['step']}_rank{self.rank}.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(found, indent=2))
            tmp.replace(path)
        return 1.0 if saved is not None else 0.0

    # ------------------------------------------------------------------ colocation
    def offload(self) -> int:
        """Free the GPU for a colocated generator (CUDA and colocated only; else a no-op returning 0).

        Gradients are dropped (None); parameters of the policy and the reference model (this rank's
        FSDP2 shards, after a reshard that frees all-gathered copies) and, if
        ``trainer.policy.optimizer_config.offload_after_step``, the optimizer state are copied into
        pinned host buffers allocated on the first offload and reused afterwards (non-blocking copies,
        then one stream synchronize); the caching allocator then returns its free blocks to the driver.

        cuBLAS keeps its workspaces (tens of MiB, allocated through the caching allocator at the first matmul)
        for the life of the process; a workspace inside a large cached segment kept the whole segment reserved
        (1.02 GiB reserved with 0.06 GiB allocated after offloading a 1.5B-shaped model on an H200), so they are
        released before ``empty_cache`` (the next matmul allocates them again).

        Returns:
            ``torch.cuda.memory_reserved()`` afterwards, bytes (also kept as
            ``memory/trainer_reserved_bytes_offloaded``). When that is more than
            :data:`OFFLOADED_RESERVE_LIMIT_BYTES` (plus the optimizer state when it stays on the GPU), an error
            line naming the allocated bytes and the largest CUDA tensors still among parameters, gradients and
            optimizer state is printed to stderr (once per trainer; the run goes on: the engine has that much
            less room) and kept in :attr:`offload_error`.
        """
        if not self.colocated or self.offloaded:
            return self.reserved_bytes_offloaded if self.colocated else 0
        self.optimizer.zero_grad(set_to_none=True)
        for name, m in (("policy", self.model), ("ref", self.ref_model)):
            if m is not None:
                move_module_to_host(m, self._host[name])
        kept_opt_bytes = 0
        if self.offload_optimizer:
            self._optimizer_state_to_host()
        else:
            kept_opt_bytes = sum(_local(v).numel() * v.element_size() for st in self.optimizer.state.values()
                                 for v in st.values() if isinstance(v, torch.Tensor) and v.is_cuda)  # this rank's shards
        torch.cuda.synchronize()  # the host buffers are complete, the GPU blocks unused
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()
        self.offloaded = True
        self.reserved_bytes_offloaded = int(torch.cuda.memory_reserved())
        limit = OFFLOADED_RESERVE_LIMIT_BYTES + kept_opt_bytes
        if self.reserved_bytes_offloaded > limit and self.offload_error is None:
            self.offload_error = (
                f"trainer offload left {self.reserved_bytes_offloaded / 2**30:.2f} GiB of CUDA memory reserved "
                f"(limit {limit / 2**30:.2f} GiB = {OFFLOADED_RESERVE_LIMIT_BYTES / 2**30:.0f} GiB"
                f"{' + the optimizer state kept on the GPU (offload_after_step=false)' if kept_opt_bytes else ''}); "
                f"still allocated: {torch.cuda.memory_allocated() / 2**30:.2f} GiB; largest CUDA tensors of the "
                f"trainer: {self._largest_cuda_tensors() or 'none (memory held outside its parameters, gradients and optimizer state)'}")
            print(f"rlctl: error: {self.offload_error}", file=sys.stderr, flush=True)
        return self.reserved_bytes_offloaded

    def onload(self) -> None:
        """Copy parameters (and offloaded optimizer state) back to the GPU, the inverse of :meth:`offload`
        (the pinned host buffers stay for the next offload). On CUDA it also starts a new peak-memory
        window (``memory/trainer_peak_reserved_bytes`` of the coming train step)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if not self.colocated or not self.offloaded:
            return
        for m in (self.model, self.ref_model):
            if m is not None:
                move_module_to_device(m, self.device)
        states = list(self.optimizer.state.values())
        for i, k in self._opt_offloaded:  # exactly what offload moved (a CPU `step` count stays on the CPU)
            states[i][k] = states[i][k].to(self.device, non_blocking=True)
        self._opt_offloaded = []
        self.offloaded = False

    def _optimizer_state_to_host(self) -> None:
        self._opt_offloaded = []
        for i, state in enumerate(self.optimizer.state.values()):
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.is_cuda:
                    state[k] = to_host_buffer(self._host["optimizer"], (i, k), v)
                    self._opt_offloaded.append((i, k))

    def _largest_cuda_tensors(self, top: int = 5) -> str:
        """``name (MiB), ...`` of the biggest CUDA tensors among parameter shards, gradients and optimizer state."""
        found: list[tuple[int, str]] = []
        names = {id(p): n for n, p in self.model.named_parameters()}
        for tag, m in (("policy", self.model), ("ref", self.ref_model)):
            for n, p in (m.named_parameters() if m is not None else ()):
                for what, t in (("", p), (".grad", p.grad)):
                    if t is not None and _local(t).is_cuda:
                        found.append((_local(t).numel() * _local(t).element_size(), f"{tag}:{n}{what}"))
        for p, state in self.optimizer.state.items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and _local(v).is_cuda:
                    found.append((_local(v).numel() * _local(v).element_size(),
                                  f"optimizer:{names.get(id(p), '?')}.{k}"))
        found.sort(reverse=True)
        return ", ".join(f"{n} ({b / 2**20:.1f} MiB)" for b, n in found[:top])

    def memory_metrics(self) -> dict[str, float]:
        """CUDA memory of this rank, bytes (0.0 on CPU):

        * ``memory/trainer_reserved_bytes_offloaded``: ``torch.cuda.memory_reserved()`` after the last
          :meth:`offload` (in the loop: the one before this step's rollouts, i.e. what the trainer
          kept while the generator ran);
        * ``memory/trainer_peak_reserved_bytes``: ``torch.cuda.max_memory_reserved()`` since the last
          :meth:`onload` (colocated) or train step (log-probs and training of this step);
        * ``memory/trainer_peak_allocated_bytes``: ``torch.cuda.max_memory_allocated()`` over the same window (the
          tensors themselves; reserved - allocated is the caching allocator's slack, 3-16 GiB in the H200 probes).
        """
        if self.device.type != "cuda":
            return {"memory/trainer_reserved_bytes_offloaded": 0.0, "memory/trainer_peak_reserved_bytes": 0.0,
                    "memory/trainer_peak_allocated_bytes": 0.0}
        return {"memory/trainer_reserved_bytes_offloaded": float(self.reserved_bytes_offloaded),
                "memory/trainer_peak_reserved_bytes": float(torch.cuda.max_memory_reserved()),
                "memory/trainer_peak_allocated_bytes": float(torch.cuda.max_memory_allocated())}

    # ------------------------------------------------------------------ weights out
    def iter_weight_buckets(self, bucket_bytes: int, dtype: torch.dtype | None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full (unsharded) policy weights in buckets of at most ``bucket_bytes`` bytes (collective).

        Delegates to :func:`rlctl.weight_sync.iter_weight_buckets`; tensors stay on this rank's device.
        """
        from rlctl.weight_sync import iter_weight_buckets

        return iter_weight_buckets(self.model, bucket_bytes, dtype=dtype)

    # ------------------------------------------------------------------ checkpoint
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 policy state dict on CPU (collective; every rank gets it)."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self, policy_dir: Path, state_path: Path, tokenizer_src: str, extra: dict) -> None:
        """Write the policy in Hugging Face format (safetensors) and the trainer state (collective).

        Rank 0 writes; other ranks only take part in the gathers. ``extra`` (step, data position, ...)
        is stored in the trainer state with the optimizer and RNG states. ``extra`` must hold only
        str/int/float/bool/None, lists, tuples, dicts and tensors: the state is loaded with
        ``torch.load(weights_only=True)``, which refuses other objects.
        """
        sd = self.full_state_dict()
        osd = get_optimizer_state_dict(self.model, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            from safetensors.torch import save_file
            from transformers import AutoConfig, AutoTokenizer, GenerationConfig

            config = AutoConfig.from_pretrained(tokenizer_src)
            if getattr(config, "tie_word_embeddings", False):
                sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
            policy_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(policy_dir / "model.safetensors"),
                      metadata={"format": "pt"})
            config.save_pretrained(policy_dir)
            AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(policy_dir)
            try:
                GenerationConfig.from_pretrained(tokenizer_src).save_pretrained(policy_dir)
            except OSError:
                pass
            # only tensors and plain containers/scalars: load_checkpoint reads it with weights_only=True
            torch.save({"format": STATE_FORMAT, "optimizer": osd, "scheduler": self.scheduler.state_dict(),
                        "global_step": self.global_step, "extra": extra,
                        "bad_steps_in_a_row": self.bad_steps_in_a_row, "rng": _rng_state()}, state_path)
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, policy_dir: Path, state_path: Path) -> dict:
        """Restore policy weights, optimizer and RNG states saved by :meth:`save_checkpoint`.

        The trainer state is read with ``torch.load(weights_only=True)``: tensors, plain containers and
        scalars only, so a replaced ``trainer_state.pt`` cannot run code when unpickled. States written
        before format 2 (numpy RNG state as an ``ndarray``) load too: numpy's array reconstruction is the
        one extra global allowed.

        Returns the ``extra`` dict saved with it.

        Raises:
            pickle.UnpicklingError: the state file holds another Python object (the message names the
                file and the refused global).
        """
        import pickle

        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in sorted(Path(policy_dir).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, sd, options=opts)
        try:
            with torch.serialization.safe_globals(_legacy_numpy_globals()):
                state = torch.load(state_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            import re

            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            why = (f"refused global {found.group(1)}" if found else
                   next((ln.strip().split(". ")[0] for ln in str(exc).splitlines() if "WeightsUnpickler" in ln),
                        type(exc).__name__))
            raise pickle.UnpicklingError(
                f"{state_path}: refused to load the trainer state: it holds a Python object other than tensors, "
                f"plain containers and numbers ({why}); rlctl never writes one, so the file was not written by "
                "rlctl's save_checkpoint. Resume from another checkpoint (trainer.resume_path) or start "
                "fresh (trainer.resume_mode=none)") from None
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        if "scheduler" in state:  # checkpoints from before the schedule: a constant learning rate
            self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = state["global_step"]
        self.bad_steps_in_a_row = state.get("bad_steps_in_a_row", 0)
        _set_rng_state(state["rng"])
        return state["extra"]


#: ``trainer.policy.optimizer_config.scheduler`` -> transformers ``SchedulerType`` name (SkyRL's names).
SCHEDULERS = {"constant_with_warmup": "constant_with_warmup", "constant": "constant", "linear": "linear",
              "cosine": "cosine", "cosine_with_warmup": "cosine", "cosine_with_restarts": "cosine_with_restarts",
              "polynomial": "polynomial", "inverse_sqrt": "inverse_sqrt"}


def optimizer_steps_per_train_step(tcfg: Any) -> int:
    """Optimizer steps of one training step: ``update_epochs_per_batch x train_batch_size / policy_mini_batch_size``."""
    return tcfg.update_epochs_per_batch * (tcfg.train_batch_size // tcfg.policy_mini_batch_size)


def make_scheduler(optimizer: torch.optim.Optimizer, tcfg: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``trainer.policy.optimizer_config`` (``scheduler``, ``num_warmup_steps``), from
    ``transformers.get_scheduler``; stepped once per applied optimizer step (a step skipped for a non-finite loss or
    grad norm does not count), so warmup and decay count optimizer steps.

    ``cosine_with_warmup`` (SkyRL's name) is transformers' ``cosine`` (linear warmup, then cosine decay to 0).
    Decaying schedules end at ``trainer.max_steps x`` :func:`optimizer_steps_per_train_step` optimizer steps
    (a config rule requires ``trainer.max_steps`` for them); constant ones need no horizon.

    Raises:
        ValueError: an unknown scheduler name, or a decaying one without ``trainer.max_steps``.
    """
    from transformers import get_scheduler

    opt = tcfg.policy.optimizer_config
    name = SCHEDULERS.get(opt.scheduler)
    if name is None:
        raise ValueError(f"trainer.policy.optimizer_config.scheduler={opt.scheduler!r}: one of {', '.join(SCHEDULERS)}")
    total = None
    if name not in ("constant", "constant_with_warmup", "inverse_sqrt"):
        if tcfg.max_steps is None:
            raise ValueError(f"trainer.policy.optimizer_config.scheduler={opt.scheduler} decays over trainer.max_steps; set it")
        total = tcfg.max_steps * optimizer_steps_per_train_step(tcfg)
    return get_scheduler(name, optimizer, num_warmup_steps=opt.num_warmup_steps, num_training_steps=total)


def _rng_state() -> dict:
    """RNG states as tensors, ints, floats and tuples only (loadable with ``weights_only=True``).

    ``python``: ``random.getstate()`` (a tuple of ints); ``numpy``: the legacy MT19937 state with its
    624 uint32 keys as an int64 tensor ``[624]``; ``torch`` / ``cuda``: ``ByteTensor`` states.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(), "torch": torch.get_rng_state(),
          "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    """Restore :func:`_rng_state`'s states (also the older layout with numpy's own state tuple)."""
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = st["numpy"]
    if isinstance(npst, dict):
        npst = (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                npst["cached_gaussian"])
    np.random.set_state(npst)
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


STATE_FORMAT = 2  # 2: RNG states without numpy objects (1: np.random.get_state()'s tuple with an ndarray)


def _legacy_numpy_globals() -> list:
    """What unpickling a format-1 state's numpy RNG array needs (``ndarray``, ``dtype``, the uint32
    dtype class, ``_reconstruct`` under its numpy 1 and 2 module names): array constructors only."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]
