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
from pathlib import Path
from typing import Any, Iterator

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
    """Load a causal LM in fp32 (master weights) on ``device`` and apply FSDP2 per decoder block.

    ``param_dtype`` (e.g. bf16 on CUDA) is the compute dtype through ``MixedPrecisionPolicy``; None
    keeps fp32 compute (CPU). Gradients are reduced in fp32.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    if gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
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
    pads: ``[prompt, response, pads]``), so no query position is fully masked: with left padding the
    pad positions attend to nothing, which some attention kernels turn into NaN activations, and
    ``0 * NaN`` in the weight gradients then poisons the whole update even though the pads never
    enter the loss. Position ids are ``cumsum(attention_mask) - 1`` (real tokens at 0..len-1, as with
    transformers ``generate`` on left-padded prompts), so the trainer's and the ``hf`` generator's
    log-probs stay equal.

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
    ids = input_ids.gather(1, cols)
    mask = attention_mask.gather(1, cols)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
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

    handle = head.register_forward_pre_hook(pick_response_positions)
    # an instance attribute shadows the class's forward for nn.Module.__call__ (hooks still run)
    own_forward = head.__dict__.get("forward")
    if head_forward is not None:
        head.forward = lambda hidden, *_a, **_k: head_forward(head, hidden)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=t + left_max + 1)
    finally:
        handle.remove()
        if head_forward is not None:
            if own_forward is None:
                del head.forward
            else:
                head.forward = own_forward
    if out.logits.shape[:2] != (n, t) or (head_forward is not None and out.logits.shape[2:] != (int(width),)):
        raise RuntimeError(f"{caller}: the LM head gave logits of shape {tuple(out.logits.shape)}, "
                           f"expected ({n}, {t}, {width}): {type(model).__name__} does not call get_output_embeddings() "
                           "on the final hidden states")
    return out.logits


RESPONSE_KEYS = ("response_mask", "old_logprobs", "ref_logprobs")  # [N, T] tensors aligned with the response


def trim_padding(mb: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Drop the padding columns every sequence of a micro-batch shares, so the forward pass only
    computes over the micro-batch's own longest prompt and response (exact: padded positions are
    never attended and never enter the loss; position ids come from the attention mask).

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


def length_order(attention_mask: torch.Tensor) -> torch.Tensor:
    """Indices sorting sequences by their real length (tokens; stable), so that micro-batches hold
    sequences of similar length and :func:`trim_padding` removes most padding. ``attention_mask``
    [N, L] -> [N] int64 permutation."""
    return torch.sort(attention_mask.sum(1), stable=True).indices


def sorted_micro_batches(batch: dict[str, torch.Tensor], size: int) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Yield ``(idx, micro_batch)`` over ``batch`` in :func:`length_order`, ``size`` sequences at a time,
    each micro-batch trimmed by :func:`trim_padding`; ``idx`` [<= size] int64 are its rows in ``batch``."""
    order = length_order(batch["attention_mask"])
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        mb, _ = trim_padding({k: v[idx] for k, v in batch.items() if isinstance(v, torch.Tensor)})
        yield idx, mb


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
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr, betas=tuple(opt.adam_betas),
                                           weight_decay=opt.weight_decay, foreach=False)
        self.ref_model = None
        if self.algo.use_kl_loss:
            self.ref_model = load_and_shard(model_path, mesh=self.mesh, device=self.device, param_dtype=param_dtype,
                                            gradient_checkpointing=False, trainable=False)
        self.global_step = 0
        self.bad_steps_in_a_row = 0

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
        differentiable only with ``trainer.algorithm.use_entropy_loss``; otherwise it is a metric."""
        T = mb["response_mask"].shape[1]
        forward = packed_logprobs_forward if self._packed else response_logprobs_forward
        return forward(model, mb["input_ids"].to(self.device), mb["attention_mask"].to(self.device),
                       T, temperature, with_entropy=with_entropy, entropy_grad=bool(self.algo.use_entropy_loss))

    @property
    def _packed(self) -> bool:
        """``trainer.remove_microbatch_padding`` (False when the config object lacks it)."""
        return bool(getattr(self.tcfg, "remove_microbatch_padding", False))

    def _micro_batches(self, batch: dict[str, torch.Tensor], size: int,
                       train: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Yield ``(idx, micro_batch)`` like :func:`sorted_micro_batches`, but planned by
        :func:`rlctl.packing.plan_micro_batches`: ``size`` sequences each, or up to
        ``trainer.max_tokens_per_microbatch`` real tokens each when that is set.

        With a token budget the ranks may plan different numbers of micro-batches; the count is
        all-reduced (MAX) over the data-parallel group and the short ranks then yield
        :func:`rlctl.packing.empty_micro_batch` micro-batches (``idx`` empty [0]) that add nothing to the
        loss, so every rank runs the same number of forward/backward passes (FSDP2 collectives).
        ``train``: add each micro-batch's forward tokens (:func:`rlctl.packing.computed_tokens`) to
        ``self._computed_tokens``.
        """
        from rlctl.packing import computed_tokens, empty_micro_batch, plan_micro_batches

        max_tokens = getattr(self.tcfg, "max_tokens_per_microbatch", None)
        plan = plan_micro_batches(batch["attention_mask"].sum(1), size, max_tokens)
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
            ``policy/skipped_steps`` (non-finite loss or grad norm; the update is skipped); and
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
                m = self._optimizer_step(mini, temperature, micro)
                if m.pop("skipped"):
                    skipped += 1
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        metrics["policy/skipped_steps"] = float(skipped)
        metrics["policy/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["train/computed_tokens"] = float(self._computed_tokens) / tcfg.update_epochs_per_batch
        self.global_step += 1
        return metrics

    def _optimizer_step(self, mini: dict[str, torch.Tensor], temperature: float, micro: int) -> dict[str, float]:
        algo = self.algo
        mask_all = mini["response_mask"]
        num_tokens = float(mask_all.sum().item())
        num_seqs = mini["input_ids"].shape[0]
        totals = {"policy/pg_loss": 0.0, "policy/kl": 0.0, "policy/entropy": 0.0, "policy/loss": 0.0}
        clip_tokens = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        # the loss is a sum over micro-batches normalized by mini-batch totals, so their order and
        # composition do not matter: group sequences of similar length and trim the shared padding
        for _, mb in self._micro_batches(mini, micro, train=True):
            mask = mb["response_mask"].to(self.device)
            want_entropy = True
            logp, ent = self._logprobs_entropy(self.model, mb, temperature, with_entropy=want_entropy)
            reduce_kw = dict(num_sequences=num_seqs, num_tokens=num_tokens, max_response_len=self.max_response_len)
            pg_loss, pg_m = grpo.policy_loss(
                logp, mb["old_logprobs"].to(self.device), mb["advantages"].to(self.device), mask,
                eps_clip_low=algo.eps_clip_low, eps_clip_high=algo.eps_clip_high, loss_type=algo.policy_loss_type,
                clip_ratio_c=algo.clip_ratio_c, loss_reduction=algo.loss_reduction, **reduce_kw)
            loss = pg_loss
            if self.ref_model is not None:
                kl_tok = grpo.kl_penalty(logp, mb["ref_logprobs"].to(self.device), algo.kl_estimator_type)
                kl = grpo.masked_reduce(kl_tok, mask, algo.loss_reduction, **reduce_kw)
                loss = loss + algo.kl_loss_coef * kl
                totals["policy/kl"] += float(kl.detach())
            ent_red = grpo.masked_reduce(ent, mask, algo.loss_reduction, **reduce_kw)
            if algo.use_entropy_loss:
                loss = loss - algo.entropy_loss_coef * ent_red
            totals["policy/entropy"] += float(ent_red.detach())
            loss.backward()
            totals["policy/pg_loss"] += float(pg_loss.detach())
            totals["policy/loss"] += float(loss.detach())
            clip_tokens += pg_m["clip_fraction"] * float(mask.sum().item())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.policy.optimizer_config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        # every rank must agree on skipping: reduce the loss too (the grad norm is already global)
        flag = torch.tensor([0.0 if math.isfinite(totals["policy/loss"]) else 1.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag)
        finite = math.isfinite(grad_norm) and flag.item() == 0
        if finite:
            self.optimizer.step()
            self.bad_steps_in_a_row = 0
        else:
            self.bad_steps_in_a_row += 1
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

    # ------------------------------------------------------------------ colocation
    def offload(self) -> None:
        """Move parameters, gradients and optimizer state to CPU (colocated CUDA runs only)."""
        if not self.colocated:
            return
        for m in (self.model, self.ref_model):
            if m is not None:
                m.to("cpu")
        self._move_optimizer_state("cpu")
        torch.cuda.empty_cache()

    def onload(self) -> None:
        """Move parameters and optimizer state back to the GPU (inverse of :meth:`offload`)."""
        if not self.colocated:
            return
        for m in (self.model, self.ref_model):
            if m is not None:
                m.to(self.device)
        self._move_optimizer_state(self.device)

    def _move_optimizer_state(self, device) -> None:
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.to(device, non_blocking=True)

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
        is stored in the trainer state with the optimizer and RNG states.
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
            torch.save({"optimizer": osd, "global_step": self.global_step, "extra": extra,
                        "bad_steps_in_a_row": self.bad_steps_in_a_row, "rng": _rng_state()}, state_path)
        if self.world_size > 1:
            dist.barrier()

    def load_checkpoint(self, policy_dir: Path, state_path: Path) -> dict:
        """Restore policy weights, optimizer and RNG states saved by :meth:`save_checkpoint`.

        Returns the ``extra`` dict saved with it.
        """
        from safetensors.torch import load_file

        sd: dict[str, torch.Tensor] = {}
        for f in sorted(Path(policy_dir).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, sd, options=opts)
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        self.global_step = state["global_step"]
        self.bad_steps_in_a_row = state.get("bad_steps_in_a_row", 0)
        _set_rng_state(state["rng"])
        return state["extra"]


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
