"""Per-token log-probabilities (and entropy) straight from hidden states, without a full-vocabulary tensor.

The LM head of a causal LM maps hidden states h [M, H] to logits s = h W^T (+ b) of shape [M, V]. For
Qwen2.5 V = 151,936, so the logits of a few thousand response tokens, upcast to fp32, divided by the
temperature and fed through a log-softmax, are the largest tensors of a training step (several GB each,
kept for the backward pass). GRPO only needs, per position, the log-probability of the sampled token
(and the entropy, as a metric or an entropy bonus), i.e. two numbers of the V.

:class:`ChunkedLinearLogProb` computes those numbers ``chunk_size`` positions at a time: each chunk's
logits are computed in the compute dtype (e.g. bf16), log-softmaxed in fp32 and dropped; only the
per-position log-sum-exp (and entropy) is kept. The backward pass recomputes each chunk's logits and
turns them directly into the gradients of h, W (and b). Peak extra memory is a few [chunk_size, V] fp32
buffers instead of several [M, V] ones. This is the idea of Liger Kernel's fused linear cross-entropy
(https://github.com/linkedin/Liger-Kernel, ``LigerFusedLinearCrossEntropyLoss``) and of verl's
``actor.use_fused_kernels`` / SkyRL's ``trainer.fused_lm_head_logprob``; this is an independent
implementation in plain PyTorch (no Triton), written from the math in :class:`ChunkedLinearLogProb`.

Test: ``pytest tests/unit/test_logprobs.py`` (against the plain fp32 log-softmax path, and through
the FSDP2 trainer forward on 1 and 2 gloo ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

#: Positions per chunk (hard-coded: there is no config key for it). A [1024, 151,936] fp32 chunk is
#: 622 MB; the forward holds about two such buffers at a time, the backward about three.
CHUNK_POSITIONS = 1024


class ChunkedLinearLogProb(torch.autograd.Function):
    """Log-prob of ``labels`` (and entropy) under ``softmax((h W^T + b) / tau)``, chunked over positions.

    Math, per position m (row of h), with s = h_m W^T + b [V], z = s / tau, lse = logsumexp(z),
    p = softmax(z) = exp(z - lse), y = labels[m]:

    * log-prob   ``logp = z_y - lse``;                 ``d logp / ds = (onehot(y) - p) / tau``
    * entropy    ``E = lse - sum_j p_j z_j``  (= -sum p log p, the stable form verl uses);
      ``dE / ds = -p * (log p + E) / tau``  with ``log p = z - lse``.

    Given the upstream gradients g (of logp) and e (of E), ``ds = g dlogp/ds + e dE/ds`` [C, V] per
    chunk of C positions, and ``dh = ds W``, ``dW = ds^T h``, ``db = sum_m ds``. The forward keeps only
    lse [M] and E [M]; the backward recomputes each chunk's logits.

    Precision: the matmuls run in the dtype of h / W (bf16 under FSDP2 mixed precision), the softmax
    math in fp32; ``dW`` is accumulated over chunks in fp32 and cast to W's dtype at the end.

    Call through :func:`linear_logprobs` (argument checks, defaults). ``forward`` arguments:
        hidden: [M, H] hidden states (compute dtype).
        weight: [V, H] LM-head weight, same dtype as ``hidden``.
        bias: [V] or None.
        labels: [M] int64 token ids in [0, V).
        temperature: tau > 0 (float).
        chunk_size: positions per chunk (>= 1).
        with_entropy: also compute the entropy.
        entropy_grad: the entropy is differentiable (else it is returned as a non-differentiable metric).
    Returns ``(logp [M] fp32, entropy [M] fp32)``; entropy is an empty [0] tensor without ``with_entropy``.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                chunk_size: int, with_entropy: bool, entropy_grad: bool):
        m = hidden.shape[0]
        logp = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(m if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, m, chunk_size):
            end = min(start + chunk_size, m)
            z = _chunk_logits(hidden[start:end], weight, bias, temperature)  # [C, V] fp32
            c_lse = torch.logsumexp(z, dim=-1)
            lse[start:end] = c_lse
            logp[start:end] = z.gather(1, labels[start:end, None])[:, 0] - c_lse
            if with_entropy:
                p = (z - c_lse[:, None]).exp_()
                ent[start:end] = c_lse - p.mul_(z).sum(-1)
            del z
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.entropy_grad = with_entropy and entropy_grad
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias if bias is not None else hidden.new_empty(0), labels, lse,
                              ent if ctx.entropy_grad else lse.new_empty(0))
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(ent)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk_size
        if not ctx.entropy_grad:
            g_ent = None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        if (g_logp is None and g_ent is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None, None
        bias_arg = bias if ctx.has_bias else None
        m = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, m, chunk):
            end = min(start + chunk, m)
            h = hidden[start:end]
            z = _chunk_logits(h, weight, bias_arg, tau)  # [C, V] fp32
            log_p = z.sub_(lse[start:end, None])  # in place: z itself is not needed any more
            ds = log_p.exp()  # p, turned in place into d loss / d z [C, V] fp32
            if g_ent is not None:  # e * p * (log p + E), in log_p's buffer (before ds stops being p)
                ent_term = log_p.add_(ent[start:end, None]).mul_(ds).mul_(g_ent[start:end, None].float())
            if g_logp is not None:  # g * (onehot(y) - p)
                g = g_logp[start:end, None].float()
                ds.mul_(-g).scatter_add_(1, labels[start:end, None], g)
            else:
                ds.zero_()
            if g_ent is not None:
                ds.sub_(ent_term)
                del ent_term
            del z, log_p
            ds.div_(tau)
            ds_c = ds.to(weight.dtype)
            if need_h:
                grad_h[start:end] = (ds_c @ weight).to(hidden.dtype)
            if need_w:
                grad_w.add_(ds_c.t() @ h)
            if need_b:
                grad_b.add_(ds.sum(0))
            del ds, ds_c
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """``(h W^T + b) / tau`` for one chunk: h [C, H], W [V, H] -> [C, V] fp32 (matmul in h's dtype)."""
    s = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    z = s.float()  # a copy for half precision, s itself for fp32: a fresh tensor either way
    del s
    return z.div_(temperature) if temperature != 1.0 else z


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                    temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False,
                    chunk_size: int = CHUNK_POSITIONS) -> tuple[Tensor, Tensor | None]:
    """Per-token log-prob of ``labels`` (and entropy) under the LM head, chunked (:class:`ChunkedLinearLogProb`).

    Equal (up to fp32 rounding) to ``log_softmax((hidden @ weight.T + bias).float() / tau).gather(labels)``
    and :func:`rlctl.grpo.entropy_from_logits` of the same scaled logits, with the same gradients, but
    without any [M, V] tensor: peak extra memory is a few [chunk_size, V] fp32 buffers.

    Args:
        hidden: [..., H] hidden states (any leading shape, flattened to M positions), compute dtype.
        weight: [V, H] LM-head weight (``hidden`` is cast to its dtype) (under FSDP2 the unsharded, possibly bf16,
            parameter: gradients flow back to it).
        labels: [...] (``hidden``'s leading shape) integer token ids in [0, V).
        bias: [V] LM-head bias or None.
        temperature: the sampling temperature tau; logits are divided by it. 0 (greedy) means 1.
        with_entropy: also return the entropy (nats) of ``softmax(logits / tau)``.
        entropy_grad: the entropy is differentiable (an entropy loss); otherwise it is a detached metric.
        chunk_size: positions per chunk (default :data:`CHUNK_POSITIONS`).
    Returns:
        ``(logp, entropy)``: float32 tensors of ``labels``' shape (log-prob in nats); entropy is None
        without ``with_entropy``. ``logp`` is differentiable w.r.t. ``hidden``, ``weight``, ``bias``.
    Raises:
        ValueError: negative temperature, chunk_size < 1, non-integer labels, or shapes that do not match.
    """
    if temperature < 0:
        raise ValueError(f"linear_logprobs: temperature must be >= 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"linear_logprobs: chunk_size must be >= 1 position, got {chunk_size}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"linear_logprobs: labels must be integer token ids, got {labels.dtype}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_logprobs: weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"linear_logprobs: labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_logprobs: bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    tau = float(temperature) if temperature > 0 else 1.0
    lead = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)  # as F.linear needs; a no-op under FSDP2
    y = labels.reshape(-1).long()
    logp, ent = ChunkedLinearLogProb.apply(h, weight, bias, y, tau, int(chunk_size), bool(with_entropy),
                                           bool(entropy_grad))
    return logp.view(lead), (ent.view(lead) if with_entropy else None)


@contextmanager
def head_replaced(head: torch.nn.Module, pick: Callable, forward: Callable | None) -> Iterator[None]:
    """For the duration of the block, ``pick(module, args) -> args`` runs as a forward pre-hook of
    ``head`` and ``forward(head, hidden)`` (if given) replaces its ``forward`` (an instance attribute
    shadowing the class's; hooks still run). Both are removed on exit, also after an error."""
    handle = head.register_forward_pre_hook(pick)
    own_forward = head.__dict__.get("forward")
    if forward is not None:
        head.forward = lambda hidden, *_a, **_k: forward(head, hidden)
    try:
        yield
    finally:
        handle.remove()
        if forward is not None:
            if own_forward is None:
                del head.forward
            else:
                head.forward = own_forward
