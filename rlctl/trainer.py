"""The FSDP2 policy trainer: one data-parallel rank of the policy (and of the frozen reference model).

``PolicyTrainer`` loads a Hugging Face causal LM, shards it with ``torch.distributed.fsdp.fully_shard``
per decoder block (gloo on CPU, NCCL on CUDA), computes per-token log-probabilities of response
tokens, and trains with the GRPO loss of :mod:`rlctl.grpo` over mini-batches split into micro-batches
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

Test: ``pytest tests/unit/test_trainer.py`` (a 1- and 2-rank gloo group on CPU with a tiny Llama).
"""

from __future__ import annotations

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
    """Logits predicting the response tokens.

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
        raise ValueError("response_logits_forward: a row has an empty prompt (no token before its response)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"response_logits_forward: {type(model).__name__} has no output embedding (LM head)")

    def pick_response_positions(_module, args):
        hidden = args[0]  # [N, K, H]: the last K positions of the packed rows
        k = hidden.shape[1]
        if k < t + left_max + 1:
            raise RuntimeError(f"response_logits_forward: the LM head got {k} positions, fewer than the "
                               f"{t + left_max + 1} asked for with logits_to_keep")
        # response token j of row i sits at packed column length - t + j - left_i, predicted by the hidden
        # state one column earlier, i.e. index k - t - 1 - left_i + j of the last k positions
        if left_min == left_max:  # same offset for every row (always for a 1-row micro-batch): a view
            start = k - t - 1 - left_max
            return (hidden[:, start:start + t], *args[1:])
        idx = (k - t - 1 - left)[:, None] + torch.arange(t, device=hidden.device)[None, :]  # [N, T]
        return (hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1])), *args[1:])

    handle = head.register_forward_pre_hook(pick_response_positions)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                    logits_to_keep=t + left_max + 1)
    finally:
        handle.remove()
    if out.logits.shape[:2] != (n, t):
        raise RuntimeError(f"response_logits_forward: the LM head gave logits of shape {tuple(out.logits.shape)}, "
                           f"expected ({n}, {t}, V): {type(model).__name__} does not call get_output_embeddings() on the "
                           "final hidden states")
    return out.logits.float()


RESPONSE_KEYS = ("response_mask", "old_logprobs", "ref_logprobs", "tis_weights")  # [N, T] tensors aligned with the response


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
        self.scheduler = make_scheduler(self.optimizer, tcfg)
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
        T = mb["response_mask"].shape[1]
        input_ids = mb["input_ids"].to(self.device)
        attn = mb["attention_mask"].to(self.device)
        logits = response_logits_forward(model, input_ids, attn, T)
        labels = input_ids[:, -T:]
        if temperature and temperature > 0:
            logits = logits / temperature
        logp = grpo.logprobs_from_logits(logits, labels)
        ent = None
        if with_entropy:
            # entropy is a metric unless trainer.algorithm.use_entropy_loss: then no graph through it
            with torch.enable_grad() if self.algo.use_entropy_loss else torch.no_grad():
                ent = grpo.entropy_from_logits(logits)
        return logp, ent

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
        for idx, mb in sorted_micro_batches(batch, self.tcfg.micro_forward_batch_size_per_gpu):
            logp, _ = self._logprobs_entropy(model, mb, temperature, with_entropy=False)
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
            ``policy/skipped_steps`` (non-finite loss or grad norm; the update is skipped).
        Raises:
            RuntimeError: ``trainer.max_bad_steps`` non-finite optimizer steps in a row.
        """
        tcfg = self.tcfg
        n = batch["input_ids"].shape[0]
        micro = tcfg.micro_train_batch_size_per_gpu
        sums: dict[str, float] = {}
        count = 0
        skipped = 0
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
        metrics["policy/lr"] = lr
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
        for _, mb in sorted_micro_batches(mini, micro):
            mask = mb["response_mask"].to(self.device)
            want_entropy = True
            logp, ent = self._logprobs_entropy(self.model, mb, temperature, with_entropy=want_entropy)
            reduce_kw = dict(num_sequences=num_seqs, num_tokens=num_tokens, max_response_len=self.max_response_len)
            pg_loss, pg_m = grpo.policy_loss(
                logp, mb["old_logprobs"].to(self.device), mb["advantages"].to(self.device), mask,
                eps_clip_low=algo.eps_clip_low, eps_clip_high=algo.eps_clip_high, loss_type=algo.policy_loss_type,
                token_weights=mb["tis_weights"].to(self.device) if "tis_weights" in mb else None,
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
            torch.save({"optimizer": osd, "scheduler": self.scheduler.state_dict(), "global_step": self.global_step, "extra": extra,
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
        if getattr(tcfg, "max_steps", None) is None:
            raise ValueError(f"trainer.policy.optimizer_config.scheduler={opt.scheduler} decays over trainer.max_steps; set it")
        total = tcfg.max_steps * optimizer_steps_per_train_step(tcfg)
    return get_scheduler(name, optimizer, num_warmup_steps=opt.num_warmup_steps, num_training_steps=total)


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
