"""GRPO algorithm core: advantages, KL penalties, loss reductions and the clipped policy loss.

This module holds the pure tensor math of GRPO training, with no config objects, no
distributed code and no model code. The trainer reads config keys and passes their values
as plain arguments:

====================================================  ========================================
config key                                            argument
====================================================  ========================================
``trainer.algorithm.grpo_norm_by_std``                ``grpo_advantages(norm_by_std=...)``
``trainer.algorithm.zero_variance_filter``            use ``zero_variance_sample_mask``
``trainer.algorithm.kl_estimator_type``               ``kl_penalty(estimator=...)``
``trainer.algorithm.loss_reduction``                  ``masked_reduce(loss_reduction=...)``
``trainer.algorithm.policy_loss_type``                ``policy_loss(loss_type=...)``
``trainer.algorithm.eps_clip_low`` / ``_high``        ``policy_loss(eps_clip_low/high=...)``
``trainer.algorithm.clip_ratio_c``                    ``policy_loss(clip_ratio_c=...)``
``trainer.algorithm.kl_loss_coef``                    ``combine_losses(kl_coef=...)``
``trainer.algorithm.entropy_loss_coef``               ``combine_losses(entropy_coef=...)``
====================================================  ========================================

The trainer combines the pieces as::

    loss = pg_loss + kl_loss_coef * masked_reduce(kl) - entropy_loss_coef * masked_reduce(entropy)

Shape conventions used in every docstring: ``[B]`` is one value per sequence (response),
``[B, T]`` is one value per response token (right-padded), ``mask`` is a float or bool
``[B, T]`` tensor that is 1/True on valid response tokens and 0/False on padding.
``[B, T, V]`` are logits over a vocabulary of size ``V``.

Gradient accumulation: a mini-batch is split into micro-batches whose losses are summed
(each one backpropagated separately). The loss reductions take the mini-batch totals
(``num_tokens``, ``num_sequences``, ``max_response_len``) as denominators, so the sum of the
micro-batch losses equals the loss of the whole mini-batch exactly.

Sources: GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300); Dr. GRPO (Liu et al. 2025,
"Understanding R1-Zero-Like Training", arXiv:2503.20783); PPO clipped surrogate (Schulman et
al. 2017, arXiv:1707.06347); dual clip (Ye et al. 2020, arXiv:1912.09729); KL estimators k1/k2/k3
(J. Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html);
token-mean reduction and asymmetric clip-higher (DAPO, Yu et al. 2025, arXiv:2503.14476).
Conventions (unbiased std, k3 clamps, log-ratio clamp) follow verl
(``verl/trainer/ppo/core_algos.py``) and SkyRL (``skyrl_train/utils/ppo_utils.py``).

Testing: everything here runs on CPU in milliseconds::

    pytest tests/unit/test_grpo.py -q
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_REDUCTIONS",
    "POLICY_LOSS_TYPES",
    "combine_losses",
    "entropy_from_logits",
    "grpo_advantages",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_reduce",
    "policy_loss",
    "zero_variance_groups",
    "zero_variance_sample_mask",
]

#: Valid ``estimator`` names of :func:`kl_penalty` (config ``trainer.algorithm.kl_estimator_type``).
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "abs")
#: verl spellings accepted as aliases of the names above.
_KL_ALIASES: dict[str, str] = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
#: Valid ``loss_reduction`` names of :func:`masked_reduce` (config ``trainer.algorithm.loss_reduction``).
LOSS_REDUCTIONS: tuple[str, ...] = ("token_mean", "sequence_mean", "seq_mean_token_sum_norm")
#: Valid ``loss_type`` names of :func:`policy_loss` (config ``trainer.algorithm.policy_loss_type``).
POLICY_LOSS_TYPES: tuple[str, ...] = ("regular", "dual_clip")

# exp() of a log-ratio is computed after clamping the log-ratio to [-20, 20] (as verl and SkyRL
# do) so that a stale or corrupted logprob cannot overflow to inf and poison the step.
_LOG_RATIO_CLAMP = 20.0
# k3 is clamped to [-10, 10] (verl ``low_var_kl`` and SkyRL ``k3``); k3 >= 0, so only the upper
# bound can bind.
_K3_CLAMP = 10.0


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_group_layout(rewards: Tensor, group_size: int) -> int:
    """Validate a group-major ``[B]`` reward vector; return the number of groups."""
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    batch = rewards.shape[0]
    if batch % group_size != 0:
        raise ValueError(
            f"number of rewards ({batch}) is not divisible by group_size ({group_size}); "
            "rewards must be laid out group-major with group_size samples per prompt"
        )
    return batch // group_size


def _check_2d_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.dim() != 2:
        raise ValueError(f"{name_a} must be 2-D [B, T], got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _float_dtype(t: Tensor) -> torch.dtype:
    """Compute dtype for reductions: at least float32 (bf16/fp16 sums lose too much precision)."""
    if t.dtype in (torch.float32, torch.float64):
        return t.dtype
    return torch.float32


# --------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def grpo_advantages(rewards: Tensor, group_size: int, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative outcome advantages of GRPO (one scalar reward per response).

    For each group of ``group_size`` samples of the same prompt::

        norm_by_std=True  (GRPO, Shao et al. 2024):   A_i = (r_i - mean(r)) / (std(r) + eps)
        norm_by_std=False (Dr. GRPO, Liu et al. 2025): A_i =  r_i - mean(r)

    ``std`` is the *unbiased* (Bessel-corrected, ``n - 1`` denominator) sample standard
    deviation, ``torch.std(..., unbiased=True)``, which is what SkyRL's and verl's
    ``compute_grpo_outcome_advantage`` use. A group whose rewards are all equal gets
    advantage 0 in both modes (std 0, numerator 0). ``norm_by_std=False`` is config
    ``trainer.algorithm.grpo_norm_by_std=false``.

    Groups of size 1 get advantage 0 (no baseline can be formed from one sample). Note this
    differs from SkyRL/verl, which use mean 0 and std 1 for a singleton group and so return
    ``r / (1 + eps)``.

    Args:
        rewards: ``[B]`` rewards, any real or bool dtype, laid out group-major: rows
            ``0..n-1`` are the samples of prompt 0, rows ``n..2n-1`` of prompt 1, etc.
        group_size: ``n``, samples per prompt (``>= 1``).
        norm_by_std: divide by the group std (GRPO) or not (Dr. GRPO).
        eps: added to the std before dividing (``>= 0``).

    Returns:
        ``[B]`` advantages, in ``rewards.dtype`` if it is float32/float64, else float32.
        Computed under ``torch.no_grad()``.

    Raises:
        ValueError: ``rewards`` not 1-D, ``group_size < 1``, ``B`` not divisible by
            ``group_size``, or ``eps < 0``.
    """
    num_groups = _check_group_layout(rewards, group_size)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = rewards.to(_float_dtype(rewards))
    if group_size == 1:
        return torch.zeros_like(r)
    grouped = r.view(num_groups, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if norm_by_std:
        std = grouped.std(dim=1, unbiased=True, keepdim=True)
        centered = centered / (std + eps)
    return centered.reshape(-1)


@torch.no_grad()
def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Which groups have zero reward variance (all rewards in the group equal).

    Such groups carry no GRPO learning signal (all advantages are 0). Used for the metric
    "fraction of groups with zero reward variance" (``.float().mean()`` of the result) and for
    ``trainer.algorithm.zero_variance_filter`` via :func:`zero_variance_sample_mask`.
    DAPO's dynamic sampling (arXiv:2503.14476) filters the same groups.

    Equality is exact (``max == min``); a group of size 1 is always zero-variance.

    Args:
        rewards: ``[B]`` rewards, group-major layout (see :func:`grpo_advantages`).
        group_size: ``n``, samples per prompt (``>= 1``).

    Returns:
        ``[B // group_size]`` bool tensor, True where the group's rewards are all equal.

    Raises:
        ValueError: ``rewards`` not 1-D, ``group_size < 1`` or ``B`` not divisible by ``group_size``.
    """
    num_groups = _check_group_layout(rewards, group_size)
    grouped = rewards.view(num_groups, group_size)
    if grouped.dtype == torch.bool:
        grouped = grouped.to(torch.int8)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


@torch.no_grad()
def zero_variance_sample_mask(rewards: Tensor, group_size: int) -> Tensor:
    """Per-sample keep mask for ``trainer.algorithm.zero_variance_filter``.

    Multiply it into the token mask (``mask * keep[:, None]``) to drop samples of
    zero-variance groups from the loss. Count ``num_tokens`` / ``num_sequences`` for
    :func:`masked_reduce` *after* applying it, so the dropped samples do not dilute the mean.

    Args:
        rewards: ``[B]`` rewards, group-major layout (see :func:`grpo_advantages`).
        group_size: ``n``, samples per prompt (``>= 1``).

    Returns:
        ``[B]`` float32 tensor: 0.0 for samples in zero-variance groups, 1.0 otherwise.

    Raises:
        ValueError: same as :func:`zero_variance_groups`.
    """
    keep_group = ~zero_variance_groups(rewards, group_size)
    return keep_group.repeat_interleave(group_size).to(torch.float32)


# --------------------------------------------------------------------------------------------
# KL penalty
# --------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token logprobs.

    With ``log_ratio = logprobs - ref_logprobs`` (tokens sampled from pi_theta), the
    estimators of Schulman (2020, "Approximating KL divergence") are:

    * ``k1``:  ``log_ratio`` (unbiased, high variance, can be negative);
    * ``k2``:  ``0.5 * log_ratio**2`` (biased, low variance, >= 0);
    * ``k3``:  ``exp(-log_ratio) + log_ratio - 1``, i.e.
      ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, low variance, >= 0). As in verl
      (``low_var_kl``) and SkyRL (``k3``), ``ref - logp`` is clamped to [-20, 20] before
      ``exp`` and the result is clamped to [-10, 10] for numerical stability;
    * ``abs``: ``|log_ratio|``.

    verl's spellings ``kl``, ``mse`` and ``low_var_kl`` are accepted as aliases of k1, k2, k3.
    This is config ``trainer.algorithm.kl_estimator_type``. Reduce the result with
    :func:`masked_reduce`; padding positions are not masked here.

    Args:
        logprobs: ``[B, T]`` float logprobs of the sampled tokens under the current policy.
        ref_logprobs: ``[B, T]`` float logprobs of the same tokens under the reference policy.
        estimator: one of ``k1``, ``k2``, ``k3``, ``abs``.

    Returns:
        ``[B, T]`` per-token KL estimate, dtype of ``logprobs - ref_logprobs``; differentiable
        w.r.t. ``logprobs``.

    Raises:
        ValueError: unknown ``estimator`` (the message lists the valid names) or shape mismatch.
    """
    name = _KL_ALIASES.get(estimator, estimator)
    if name not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid names: {', '.join(KL_ESTIMATORS)}"
        )
    _check_2d_pair("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    log_ratio = logprobs - ref_logprobs
    if name == "k1":
        return log_ratio
    if name == "k2":
        return 0.5 * log_ratio.square()
    if name == "abs":
        return log_ratio.abs()
    # k3
    neg = torch.clamp(-log_ratio, min=-_LOG_RATIO_CLAMP, max=_LOG_RATIO_CLAMP)
    kld = torch.exp(neg) - neg - 1.0
    return torch.clamp(kld, min=-_K3_CLAMP, max=_K3_CLAMP)


# --------------------------------------------------------------------------------------------
# loss reduction
# --------------------------------------------------------------------------------------------


def masked_reduce(
    values: Tensor,
    mask: Tensor,
    loss_reduction: str,
    *,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
    max_response_len: int | None = None,
) -> Tensor:
    """Reduce per-token values ``[B, T]`` to a scalar loss (config ``trainer.algorithm.loss_reduction``).

    * ``token_mean`` (DAPO, arXiv:2503.14476): ``sum(values * mask) / num_tokens``; every
      valid token of the mini-batch has the same weight.
    * ``sequence_mean`` (original GRPO, arXiv:2402.03300):
      ``sum_i(sum_t(values * mask)_i / n_valid_i) / num_sequences``, the mean over sequences
      of each sequence's token mean. A sequence with no valid token contributes 0.
    * ``seq_mean_token_sum_norm`` (Dr. GRPO, arXiv:2503.20783):
      ``sum_i(sum_t(values * mask)_i / max_response_len) / num_sequences``, which removes the
      length bias by dividing by a constant instead of each sequence's length.

    Gradient accumulation: pass the totals of the whole *mini-batch* as ``num_tokens``
    (valid tokens), ``num_sequences`` (sequences) and ``max_response_len`` (the generation
    limit, ``max_new_tokens``). Every reduction is then a sum of per-token or per-sequence
    terms over a fixed denominator, so the sum over micro-batches of ``masked_reduce`` equals
    ``masked_reduce`` of the concatenated mini-batch exactly. When an argument is None this
    micro-batch's own value is used: ``mask.sum()``, ``B`` and ``T`` respectively.

    A batch with no valid token returns 0 (never NaN), still attached to the graph of
    ``values`` so ``backward()`` works and gives zero gradients.

    Args:
        values: ``[B, T]`` float per-token values (e.g. policy loss, KL, entropy).
        mask: ``[B, T]`` float or bool valid-token mask.
        loss_reduction: ``token_mean``, ``sequence_mean`` or ``seq_mean_token_sum_norm``.
        num_sequences: sequences in the mini-batch (``>= 1``); used by ``sequence_mean``
            and ``seq_mean_token_sum_norm``.
        num_tokens: valid tokens in the mini-batch (``>= 0``); used by ``token_mean``.
        max_response_len: generation limit (``>= 1``); used by ``seq_mean_token_sum_norm``.

    Returns:
        0-dim tensor; float32 for half-precision ``values``, else ``values.dtype``.

    Raises:
        ValueError: unknown ``loss_reduction`` (the message lists the valid names), shape
            mismatch, or a non-positive ``num_sequences`` / ``max_response_len`` or negative
            ``num_tokens``.
    """
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(
            f"unknown loss_reduction {loss_reduction!r}; valid names: {', '.join(LOSS_REDUCTIONS)}"
        )
    _check_2d_pair("values", values, "mask", mask)
    if num_sequences is not None and num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    if num_tokens is not None and num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if max_response_len is not None and max_response_len < 1:
        raise ValueError(f"max_response_len must be >= 1, got {max_response_len}")

    dtype = _float_dtype(values)
    m = mask.to(dtype)
    # where() rather than values * m, so that inf/NaN in padding positions cannot leak in.
    masked = torch.where(m != 0, values.to(dtype) * m, torch.zeros((), dtype=dtype, device=values.device))

    if loss_reduction == "token_mean":
        total = masked.sum()
        if num_tokens is None:
            denom = m.sum()
            return total / denom.clamp(min=torch.finfo(dtype).tiny) * (denom > 0)
        if num_tokens == 0:
            return total * 0.0
        return total / num_tokens

    seqs = values.shape[0] if num_sequences is None else num_sequences
    if values.shape[0] == 0:
        return masked.sum() * 0.0
    if loss_reduction == "sequence_mean":
        per_seq_count = m.sum(dim=1)
        per_seq = masked.sum(dim=1) / per_seq_count.clamp(min=torch.finfo(dtype).tiny) * (per_seq_count > 0)
        return per_seq.sum() / seqs
    # seq_mean_token_sum_norm
    length = values.shape[1] if max_response_len is None else max_response_len
    if length == 0:
        return masked.sum() * 0.0
    return masked.sum() / length / seqs


# --------------------------------------------------------------------------------------------
# policy loss
# --------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_clip_low: float,
    eps_clip_high: float,
    loss_type: str = "regular",
    clip_ratio_c: float = 3.0,
    loss_reduction: str = "token_mean",
    num_sequences: int | None = None,
    num_tokens: float | None = None,
    max_response_len: int | None = None,
    metrics_as_tensors: bool = False,
) -> tuple[Tensor, dict[str, float] | dict[str, Tensor]]:
    """PPO clipped surrogate policy loss with asymmetric clipping and optional dual clip.

    Per token (Schulman et al. 2017, PPO; GRPO uses it with group-relative advantages)::

        ratio   = exp(logprobs - old_logprobs)        # log-ratio clamped to [-20, 20] first
        pg1     = -A * ratio
        pg2     = -A * clamp(ratio, 1 - eps_clip_low, 1 + eps_clip_high)
        loss_t  = max(pg1, pg2)

    ``eps_clip_high > eps_clip_low`` is DAPO's "clip-higher" (arXiv:2503.14476).
    ``loss_type="dual_clip"`` (Ye et al. 2020, arXiv:1912.09729) also bounds the loss of
    tokens with negative advantage: for ``A < 0``, ``loss_t = min(loss_t, -A * clip_ratio_c)``,
    so a huge ratio on a bad token cannot produce an unbounded update. The token losses are
    then reduced with :func:`masked_reduce` (``loss_reduction`` and the mini-batch totals
    ``num_sequences`` / ``num_tokens`` / ``max_response_len`` are passed through).

    Metrics (python floats, computed without grad over this micro-batch's valid tokens; all
    0.0 when there is none; with ``metrics_as_tensors=True`` 0-dim float32 tensors on the
    device of ``logprobs`` instead, so that a training loop can accumulate them without a
    host-device synchronization per micro-batch):

    * ``clip_fraction``: fraction of tokens where ``pg2 > pg1`` (the clip is active);
    * ``dual_clip_fraction``: fraction of tokens where the dual clip bound is active
      (always 0.0 for ``regular``);
    * ``ratio_mean``, ``ratio_max``: mean and max of ``ratio``;
    * ``approx_kl``: mean of ``old_logprobs - logprobs`` (k1 estimate of KL(old || new)).

    Args:
        logprobs: ``[B, T]`` float logprobs of the sampled tokens under the current policy
            (with grad).
        old_logprobs: ``[B, T]`` float logprobs under the policy that generated the samples.
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]`` float advantages.
        mask: ``[B, T]`` float or bool valid-token mask.
        eps_clip_low: lower clip epsilon, ``0 <= eps_clip_low < 1``.
        eps_clip_high: upper clip epsilon, ``>= 0``.
        loss_type: ``regular`` or ``dual_clip`` (config ``trainer.algorithm.policy_loss_type``).
        clip_ratio_c: dual-clip constant, must be ``> 1`` when ``loss_type="dual_clip"``.
        loss_reduction, num_sequences, num_tokens, max_response_len: see :func:`masked_reduce`.
        metrics_as_tensors: return the metrics as 0-dim tensors (no ``.tolist()``).

    Returns:
        ``(loss, metrics)``: 0-dim loss tensor (differentiable w.r.t. ``logprobs``) and a
        ``dict[str, float]`` (or ``dict[str, Tensor]``) with the keys above.

    Raises:
        ValueError: unknown ``loss_type`` or ``loss_reduction``, clip epsilons out of range,
            ``clip_ratio_c <= 1`` with ``dual_clip``, or shape mismatches.
    """
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(
            f"unknown policy loss_type {loss_type!r}; valid names: {', '.join(POLICY_LOSS_TYPES)}"
        )
    if not 0.0 <= eps_clip_low < 1.0:
        raise ValueError(f"eps_clip_low must be in [0, 1), got {eps_clip_low}")
    if eps_clip_high < 0.0:
        raise ValueError(f"eps_clip_high must be >= 0, got {eps_clip_high}")
    if loss_type == "dual_clip" and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for dual_clip, got {clip_ratio_c}")
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(
            f"unknown loss_reduction {loss_reduction!r}; valid names: {', '.join(LOSS_REDUCTIONS)}"
        )
    _check_2d_pair("logprobs", logprobs, "old_logprobs", old_logprobs)
    _check_2d_pair("logprobs", logprobs, "mask", mask)
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(
                f"advantages [B] must have B={logprobs.shape[0]} entries, got {advantages.shape[0]}"
            )
        adv = advantages.unsqueeze(-1)
    elif advantages.shape == logprobs.shape:
        adv = advantages
    else:
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}"
        )
    adv = adv.detach()
    old = old_logprobs.detach()

    log_ratio = torch.clamp(logprobs - old, min=-_LOG_RATIO_CLAMP, max=_LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - eps_clip_low, 1.0 + eps_clip_high)
    clipped = torch.maximum(pg1, pg2)
    if loss_type == "dual_clip":
        bound = -adv * clip_ratio_c
        token_loss = torch.where(adv < 0, torch.minimum(clipped, bound), clipped)
    else:
        token_loss = clipped

    loss = masked_reduce(
        token_loss,
        mask,
        loss_reduction,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_response_len=max_response_len,
    )

    with torch.no_grad():
        valid = mask != 0
        n = valid.sum()
        nf = n.clamp(min=1).to(torch.float32)
        has = (n > 0).to(torch.float32)
        r = ratio.detach().float()
        clip_frac = ((pg2 > pg1) & valid).sum() / nf
        if loss_type == "dual_clip":
            dual_frac = ((adv < 0) & (bound < clipped) & valid).sum() / nf
        else:
            dual_frac = torch.zeros((), device=r.device)
        ratio_mean = torch.where(valid, r, 0.0).sum() / nf
        ratio_max = torch.where(valid, r, -math.inf).amax() if r.numel() else torch.zeros((), device=r.device)
        ratio_max = torch.where(n > 0, ratio_max, 0.0)
        approx_kl = torch.where(valid, (old - logprobs.detach()).float(), 0.0).sum() / nf
        stats = torch.stack(
            [clip_frac * has, dual_frac * has, ratio_mean, ratio_max.float(), approx_kl]
        ).float()
    names = ("clip_fraction", "dual_clip_fraction", "ratio_mean", "ratio_max", "approx_kl")
    metrics = dict(zip(names, stats.unbind() if metrics_as_tensors else stats.tolist()))
    return loss, metrics


def combine_losses(
    pg_loss: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> Tensor:
    """Total GRPO loss: ``pg_loss + kl_coef * kl - entropy_coef * entropy``.

    ``kl`` and ``entropy`` are already-reduced scalars (``masked_reduce`` of
    :func:`kl_penalty` and :func:`entropy_from_logits`, with the same denominators as the
    policy loss). The entropy term is a bonus (subtracted), config
    ``trainer.algorithm.entropy_loss_coef``; ``kl_coef`` is ``trainer.algorithm.kl_loss_coef``
    (GRPO puts the KL in the loss, not in the reward, arXiv:2402.03300 eq. 3).
    A term whose coefficient is 0 is skipped even if its tensor is given.

    Args:
        pg_loss: 0-dim policy loss from :func:`policy_loss`.
        kl: 0-dim reduced KL, or None.
        kl_coef: KL coefficient (``>= 0``).
        entropy: 0-dim reduced entropy, or None.
        entropy_coef: entropy bonus coefficient (``>= 0``).

    Returns:
        0-dim tensor.

    Raises:
        ValueError: a nonzero coefficient without its tensor, a negative coefficient, or a
            non-scalar term.
    """
    if kl_coef < 0 or entropy_coef < 0:
        raise ValueError(f"kl_coef and entropy_coef must be >= 0, got {kl_coef} and {entropy_coef}")
    for name, t in (("pg_loss", pg_loss), ("kl", kl), ("entropy", entropy)):
        if t is not None and t.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim (reduced) tensor, got shape {tuple(t.shape)}")
    loss = pg_loss
    if kl_coef != 0.0:
        if kl is None:
            raise ValueError(f"kl_coef={kl_coef} is nonzero but kl is None")
        loss = loss + kl_coef * kl
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError(f"entropy_coef={entropy_coef} is nonzero but entropy is None")
        loss = loss - entropy_coef * entropy
    return loss


# --------------------------------------------------------------------------------------------
# logits -> per-token quantities
# --------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-token entropy of the categorical distribution ``softmax(logits)``.

    Uses the numerically stable form ``H = logsumexp(l) - sum(softmax(l) * l)`` (as verl),
    which has no ``log(0)``: fully peaked distributions give 0, uniform ones ``log V``.
    Computed in float32 for half-precision logits (this materializes one fp32 ``[B, T, V]``
    softmax; for entropy as a metric only, call under ``torch.no_grad()``).

    Args:
        logits: ``[B, T, V]`` (or any ``[..., V]``) float logits.

    Returns:
        ``[B, T]`` (``logits.shape[:-1]``) entropy in nats; float32 for half-precision
        logits, else ``logits.dtype``. Differentiable.

    Raises:
        ValueError: ``logits`` has fewer than 1 dimension or an empty vocabulary dimension.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    lf = logits.to(_float_dtype(logits))
    probs = torch.softmax(lf, dim=-1)
    return torch.logsumexp(lf, dim=-1) - (probs * lf).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of ``labels`` under ``log_softmax(logits / temperature)``.

    Computes ``logits.gather(labels) - logsumexp(logits)`` instead of a full
    ``log_softmax`` so that no extra ``[B, T, V]`` output is materialized. For half-precision
    logits the logsumexp is done in float32 one sequence at a time (peak extra memory of one
    ``[T, V]`` fp32 row when run without grad), as verl's ``logprobs_from_logits_v2`` does.

    The sampling temperature must match the one used for rollouts so the logprobs are those
    of the sampling distribution. ``temperature == 0`` (greedy decoding) is treated as 1.0:
    greedy rollout logprobs are reported from the unscaled logits.

    Args:
        logits: ``[B, T, V]`` float logits (position t predicts ``labels[:, t]``; the caller
            does the shift).
        labels: ``[B, T]`` integer token ids in ``[0, V)``.
        temperature: ``>= 0``; 0 means 1.0.

    Returns:
        ``[B, T]`` logprobs; float32 for half-precision logits, else ``logits.dtype``.
        Differentiable w.r.t. ``logits``.

    Raises:
        ValueError: ``temperature < 0``, non-integer ``labels``, or shapes that do not match.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if temperature != 0 and temperature != 1.0:
        logits = logits / temperature
    idx = labels.long().unsqueeze(-1)
    out_dtype = _float_dtype(logits)
    if logits.dtype == out_dtype or logits.dim() < 2:
        lf = logits.to(out_dtype)
        return lf.gather(-1, idx).squeeze(-1) - torch.logsumexp(lf, dim=-1)
    rows = []
    for row_logits, row_idx in zip(logits, idx):
        row = row_logits.to(out_dtype)
        rows.append(row.gather(-1, row_idx).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)
