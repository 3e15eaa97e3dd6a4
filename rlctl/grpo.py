"""GRPO algorithm core: advantages, KL penalties, loss reductions and the clipped policy loss.

Also the common variants (RLOO, REINFORCE++, GSPO, truncated importance sampling) and the
pure helpers of dynamic sampling, overlong punishment and pass@k.

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

Besides GRPO advantages, :func:`compute_advantages` dispatches by name (table
:data:`ADVANTAGE_ESTIMATORS`) to RLOO (:func:`rloo_advantages`) and REINFORCE++
(:func:`reinforce_pp_advantages`). :func:`policy_loss` also computes GSPO
(``loss_type="gspo"``) and takes per-token loss weights, e.g. the truncated
importance-sampling weights of :func:`tis_weights` that correct the mismatch between the
rollout engine's and the trainer's log-probs. Pure helpers for the loop: dynamic sampling
(:func:`informative_groups`, :func:`select_informative` for DAPO ``filter``,
:func:`replace_flat_groups` for POLARIS ``replace``), DAPO's soft overlong punishment
(:func:`overlong_penalty`) and the unbiased pass@k estimator (:func:`pass_at_k`).

Sources: GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300); RLOO (Ahmadian et al. 2024,
arXiv:2402.14740); REINFORCE++ (Hu 2025, arXiv:2501.03262); Dr. GRPO (Liu et al. 2025,
"Understanding R1-Zero-Like Training", arXiv:2503.20783); PPO clipped surrogate (Schulman et
al. 2017, arXiv:1707.06347); dual clip (Ye et al. 2020, arXiv:1912.09729); KL estimators k1/k2/k3
(J. Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html);
token-mean reduction and asymmetric clip-higher (DAPO, Yu et al. 2025, arXiv:2503.14476);
GSPO (Zheng et al. 2025, arXiv:2507.18071); truncated importance sampling (Yao et al. 2025,
https://fengyao.notion.site/off-policy-rl); dynamic sampling and overlong punishment (DAPO);
POLARIS (An et al. 2025, https://github.com/ChenxinAn-fdu/POLARIS); pass@k (Chen et al. 2021,
arXiv:2107.03374).
Conventions (unbiased std, k3 clamps, log-ratio clamp) follow verl
(``verl/trainer/ppo/core_algos.py``) and SkyRL (``skyrl_train/utils/ppo_utils.py``).

Testing: everything here runs on CPU in milliseconds::

    pytest tests/unit/test_grpo.py tests/unit/test_algorithms.py -q
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_REDUCTIONS",
    "POLICY_LOSS_TYPES",
    "TIS_RATIO_TYPES",
    "combine_losses",
    "compute_advantages",
    "entropy_from_logits",
    "grpo_advantages",
    "informative_groups",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_reduce",
    "overlong_penalty",
    "pass_at_k",
    "policy_loss",
    "reinforce_pp_advantages",
    "replace_flat_groups",
    "rloo_advantages",
    "select_informative",
    "tis_weights",
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
POLICY_LOSS_TYPES: tuple[str, ...] = ("regular", "dual_clip", "gspo")
#: Valid ``ratio_type`` names of :func:`tis_weights`.
TIS_RATIO_TYPES: tuple[str, ...] = ("token", "sequence")

# exp() of a log-ratio is computed after clamping the log-ratio to [-20, 20] (as verl and SkyRL
# do) so that a stale or corrupted logprob cannot overflow to inf and poison the step.
_LOG_RATIO_CLAMP = 20.0
# GSPO's sequence log-ratio is clamped to at most 10 before exp(), as verl and SkyRL do.
_GSPO_LOG_RATIO_MAX = 10.0
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


def _shape_or_type(x: object) -> object:
    """For error messages: the shape of a tensor, else the type name."""
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


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
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out (RLOO) outcome advantages (one scalar reward per response).

    Each sample's baseline is the mean reward of the *other* ``n - 1`` samples of its group::

        A_i = r_i - (sum_j r_j - r_i) / (n - 1)  =  n / (n - 1) * (r_i - mean(r))

    No std normalization. Source: Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv:2402.14740
    (originally Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!");
    same values as SkyRL's and verl's ``compute_rloo_outcome_advantage``. Groups of size 1
    get advantage 0 (no other sample to form a baseline), as in SkyRL.

    Args:
        rewards: ``[B]`` rewards, any real or bool dtype, group-major layout (see
            :func:`grpo_advantages`).
        group_size: ``n``, samples per prompt (``>= 1``).

    Returns:
        ``[B]`` advantages, in ``rewards.dtype`` if it is float32/float64, else float32.
        Computed under ``torch.no_grad()``.

    Raises:
        ValueError: ``rewards`` not 1-D, ``group_size < 1`` or ``B`` not divisible by ``group_size``.
    """
    num_groups = _check_group_layout(rewards, group_size)
    r = rewards.to(_float_dtype(rewards))
    if group_size == 1:
        return torch.zeros_like(r)
    grouped = r.view(num_groups, group_size)
    total = grouped.sum(dim=1, keepdim=True)
    return ((group_size * grouped - total) / (group_size - 1)).reshape(-1)


@torch.no_grad()
def reinforce_pp_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    group_baseline: bool = False,
    response_lengths: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """REINFORCE++ outcome advantages: the return whitened over the whole batch.

    Source: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models", arXiv:2501.03262. This is the *outcome-reward* variant that SkyRL and
    verl implement (``compute_reinforce_plus_plus_outcome_advantage`` with ``gamma=1`` and no
    KL in the reward): the return of every response token is the response's scalar reward
    ``r_i``, and the returns are normalized with one mean and std over the batch (global
    batch normalization, no per-prompt grouping)::

        A_i = (r_i - mean_batch) / sqrt(var_batch + eps)

    ``var_batch`` is unbiased (``N - 1`` denominator) and ``eps`` sits inside the square
    root, as in SkyRL/verl ``masked_whiten``. ``group_baseline=True`` is the
    "REINFORCE++-baseline" variant of the same paper (verl ``reinforce_plus_plus_baseline``):
    the group mean reward is subtracted first (``r_i - mean(group)``) and the result is then
    whitened over the batch.

    Weighting: SkyRL/verl whiten over *valid tokens*, so a response of ``L_i`` tokens
    counts ``L_i`` times in the mean and variance and ``N = sum_i L_i``. Pass
    ``response_lengths`` to get exactly that. With ``response_lengths=None`` each response
    counts once (``N = B``), i.e. sequence-level batch normalization. A response of length 0
    does not enter the statistics (its advantage is still computed). When ``N <= 1`` the
    variance is undefined and all advantages are 0.

    Args:
        rewards: ``[B]`` rewards, any real or bool dtype, group-major layout (see
            :func:`grpo_advantages`).
        group_size: ``n``, samples per prompt (``>= 1``); used only for the layout check and
            by ``group_baseline``.
        group_baseline: subtract the group mean before whitening (REINFORCE++-baseline).
        response_lengths: optional ``[B]`` number of valid response tokens per response
            (``>= 0``), to weight the batch statistics per token.
        eps: added to the variance before the square root (``>= 0``).

    Returns:
        ``[B]`` advantages, in ``rewards.dtype`` if it is float32/float64, else float32.
        Computed under ``torch.no_grad()``.

    Raises:
        ValueError: bad layout (see :func:`grpo_advantages`), ``eps < 0``, or
            ``response_lengths`` not ``[B]`` or negative.
    """
    num_groups = _check_group_layout(rewards, group_size)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = rewards.to(_float_dtype(rewards))
    if group_baseline:
        grouped = r.view(num_groups, group_size)
        r = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if response_lengths is None:
        w = torch.ones_like(r)
    else:
        if not isinstance(response_lengths, Tensor) or response_lengths.shape != r.shape:
            got = _shape_or_type(response_lengths)
            raise ValueError(f"response_lengths must be a [B] tensor with B={r.shape[0]}, got {got}")
        if (response_lengths < 0).any():
            raise ValueError("response_lengths must be >= 0 (tokens)")
        w = response_lengths.to(r.dtype)
    n = w.sum()
    if n <= 1:
        return torch.zeros_like(r)
    mean = (w * r).sum() / n
    var = (w * (r - mean).square()).sum() / (n - 1)
    return (r - mean) * torch.rsqrt(var + eps)


#: Advantage estimators by name: each is called as ``fn(rewards [B], group_size, **kw)``
#: and returns ``[B]`` advantages. See :func:`compute_advantages`.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce++": reinforce_pp_advantages,
}


def compute_advantages(name: str, rewards: Tensor, group_size: int, **kw: Any) -> Tensor:
    """Compute ``[B]`` outcome advantages with the estimator called ``name``.

    Dispatches to :data:`ADVANTAGE_ESTIMATORS`: ``grpo`` (:func:`grpo_advantages`, keywords
    ``norm_by_std``, ``eps``), ``rloo`` (:func:`rloo_advantages`, no keywords) and
    ``reinforce++`` (:func:`reinforce_pp_advantages`, keywords ``group_baseline``,
    ``response_lengths``, ``eps``).

    Args:
        name: estimator name, one of the keys of :data:`ADVANTAGE_ESTIMATORS`.
        rewards: ``[B]`` rewards, group-major layout.
        group_size: samples per prompt.
        **kw: keyword arguments of the chosen estimator.

    Returns:
        ``[B]`` advantages (no grad).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), a keyword the
            estimator does not take (the message names it and lists the accepted ones), or
            any error of the estimator itself.
    """
    fn = ADVANTAGE_ESTIMATORS.get(name)
    if fn is None:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid names: {', '.join(ADVANTAGE_ESTIMATORS)}"
        )
    accepted = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.name not in ("rewards", "group_size")
    ]
    for key in kw:
        if key not in accepted:
            raise ValueError(
                f"advantage estimator {name!r} takes no argument {key!r}; "
                f"accepted: {', '.join(accepted) if accepted else 'none'}"
            )
    return fn(rewards, group_size, **kw)


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


@torch.no_grad()
def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Which groups carry a learning signal: not all rewards of the group are equal.

    The complement of :func:`zero_variance_groups` (same exact-equality rule, so a group of
    size 1 is never informative). Dynamic sampling keeps (DAPO ``filter``) or duplicates
    (POLARIS ``replace``) these groups; see :func:`select_informative` and
    :func:`replace_flat_groups`.

    Args:
        rewards: ``[B]`` rewards, group-major layout (see :func:`grpo_advantages`).
        group_size: ``n``, samples per prompt (``>= 1``).

    Returns:
        ``[B // group_size]`` bool tensor, True where the group's rewards differ.

    Raises:
        ValueError: same as :func:`zero_variance_groups`.
    """
    return ~zero_variance_groups(rewards, group_size)


@torch.no_grad()
def select_informative(rewards: Tensor, group_size: int) -> Tensor:
    """Indices of the samples that belong to informative groups (DAPO dynamic sampling, ``filter``).

    DAPO (Yu et al. 2025, arXiv:2503.14476, "dynamic sampling") drops the groups whose
    rewards are all equal and keeps generating until the batch holds enough informative
    groups. This is the per-batch step of that loop: index the batch with the result
    (``batch[idx]``) and append it to the accumulated samples; the caller stops once it holds
    ``train_batch_size`` groups (``len(idx) // group_size`` groups are added per call).
    Whole groups are kept, in their original order, so the result stays group-major.

    Args:
        rewards: ``[B]`` rewards, group-major layout (see :func:`grpo_advantages`).
        group_size: ``n``, samples per prompt (``>= 1``).

    Returns:
        ``[K]`` int64 indices into ``[B]`` in ascending order, ``K`` a multiple of
        ``group_size`` (0 when no group is informative).

    Raises:
        ValueError: same as :func:`zero_variance_groups`.
    """
    keep = informative_groups(rewards, group_size).repeat_interleave(group_size)
    return torch.nonzero(keep, as_tuple=False).flatten().to(device=rewards.device)


@torch.no_grad()
def replace_flat_groups(rewards: Tensor, group_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Gather index that replaces each flat (zero-variance) group by a copy of an informative one.

    POLARIS-style dynamic sampling, ``replace`` (An et al. 2025, POLARIS,
    https://github.com/ChenxinAn-fdu/POLARIS, ``ray_trainer.py``; SkyRL
    ``handle_replace_sampling``): instead of generating more rollouts, every flat group is
    overwritten with the samples of an informative group of the same batch, so the batch
    keeps its size and every group carries a learning signal. The donor groups are drawn
    uniformly at random, *without* repetition when there are at least as many informative
    groups as flat ones (a random permutation, as SkyRL), else *with* repetition. Flat groups
    are visited in ascending order; sample ``j`` of a flat group becomes sample ``j`` of its
    donor. Informative groups keep their own samples. Apply the result to every per-sample
    tensor of the batch (``batch[idx]``); the duplicated groups are then trained on twice.

    The caller decides whether replacing is reasonable: SkyRL only replaces when more than
    ``min_replace_ratio`` of the groups are informative
    (``informative_groups(...).float().mean()``) and otherwise keeps the batch and warns.
    When no group is informative, or none is flat, the identity index is returned.

    Args:
        rewards: ``[B]`` rewards, group-major layout (see :func:`grpo_advantages`).
        group_size: ``n``, samples per prompt (``>= 1``).
        generator: optional CPU ``torch.Generator`` for reproducible donor choice.

    Returns:
        ``[B]`` int64 gather index (on ``rewards.device``).

    Raises:
        ValueError: same as :func:`zero_variance_groups`.
    """
    informative = informative_groups(rewards, group_size).cpu()
    num_groups = informative.shape[0]
    group_of = torch.arange(num_groups)
    donors = group_of[informative]
    flat = group_of[~informative]
    if len(donors) > 0 and len(flat) > 0:
        if len(donors) >= len(flat):
            pick = torch.randperm(len(donors), generator=generator)[: len(flat)]
        else:
            pick = torch.randint(0, len(donors), (len(flat),), generator=generator)
        group_of[flat] = donors[pick]
    idx = (group_of[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)
    return idx.to(device=rewards.device)


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
    token_weights: Tensor | None = None,
    metrics_as_tensors: bool = False,
) -> tuple[Tensor, dict[str, float] | dict[str, Tensor]]:
    """PPO clipped surrogate policy loss with asymmetric clipping, dual clip or GSPO.

    Per token (Schulman et al. 2017, PPO; GRPO uses it with group-relative advantages)::

        ratio   = exp(logprobs - old_logprobs)        # log-ratio clamped to [-20, 20] first
        pg1     = -A * ratio
        pg2     = -A * clamp(ratio, 1 - eps_clip_low, 1 + eps_clip_high)
        loss_t  = max(pg1, pg2)

    ``eps_clip_high > eps_clip_low`` is DAPO's "clip-higher" (arXiv:2503.14476).
    ``loss_type="dual_clip"`` (Ye et al. 2020, arXiv:1912.09729) also bounds the loss of
    tokens with negative advantage: for ``A < 0``, ``loss_t = min(loss_t, -A * clip_ratio_c)``,
    so a huge ratio on a bad token cannot produce an unbounded update.

    ``loss_type="gspo"`` (Zheng et al. 2025, "Group Sequence Policy Optimization",
    arXiv:2507.18071) replaces the token ratio by the length-normalized *sequence* ratio
    ``s_i = exp(mean over valid tokens t of (logprobs - old_logprobs))``, in the paper's
    GSPO-token form (eq. 14-15) so that ``[B, T]`` advantages also work::

        s_i,t  = sg[s_i] * pi(y_t) / sg[pi(y_t)]     # value s_i, gradient s_i * grad log pi(y_t)
        loss_t = max(-A * s_i,t, -A * clamp(s_i,t, 1 - eps_clip_low, 1 + eps_clip_high))

    (``sg`` = stop-gradient.) With ``[B]`` advantages and ``loss_reduction="sequence_mean"``
    (what the paper uses; other reductions are allowed) its gradient equals that of the
    sequence-level GSPO objective. As in verl and SkyRL (``gspo_policy_loss``), the log of
    ``s_i,t`` is clamped to at most 10 before ``exp``; ``clip_ratio_c`` is not used. The paper
    uses much smaller clip ranges than PPO (e.g. 3e-4 / 4e-4), since ``s_i`` is close to 1.

    ``token_weights`` (e.g. truncated importance-sampling weights from :func:`tis_weights`)
    multiply the per-token loss after clipping, for every loss type; they are detached (no
    gradient flows into them). ``None`` leaves the computation unchanged.

    The token losses are then reduced with :func:`masked_reduce` (``loss_reduction`` and the
    mini-batch totals ``num_sequences`` / ``num_tokens`` / ``max_response_len`` are passed
    through).

    Metrics (python floats, computed without grad over this micro-batch's valid tokens; all
    0.0 when there is none; with ``metrics_as_tensors=True`` 0-dim float32 tensors on the
    device of ``logprobs`` instead, so that a training loop can accumulate them without a
    host-device synchronization per micro-batch):

    * ``clip_fraction``: fraction of tokens where ``pg2 > pg1`` (the clip is active); for
      ``gspo`` the fraction of *sequences* (with at least one valid token) whose clip is
      active on some valid token (with ``[B]`` advantages: on all of them);
    * ``dual_clip_fraction``: fraction of tokens where the dual clip bound is active
      (always 0.0 for ``regular`` and ``gspo``);
    * ``ratio_mean``, ``ratio_max``: mean and max of ``ratio`` over valid tokens; for ``gspo``
      of ``s_i`` over sequences with at least one valid token;
    * ``approx_kl``: mean of ``old_logprobs - logprobs`` (k1 estimate of KL(old || new)).

    Args:
        logprobs: ``[B, T]`` float logprobs of the sampled tokens under the current policy
            (with grad).
        old_logprobs: ``[B, T]`` float logprobs under the policy that generated the samples.
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]`` float advantages.
        mask: ``[B, T]`` float or bool valid-token mask.
        eps_clip_low: lower clip epsilon, ``0 <= eps_clip_low < 1``.
        eps_clip_high: upper clip epsilon, ``>= 0``.
        loss_type: ``regular``, ``dual_clip`` or ``gspo`` (config
            ``trainer.algorithm.policy_loss_type``).
        clip_ratio_c: dual-clip constant, must be ``> 1`` when ``loss_type="dual_clip"``.
        loss_reduction, num_sequences, num_tokens, max_response_len: see :func:`masked_reduce`.
        token_weights: optional ``[B, T]`` float per-token loss weights (detached).
        metrics_as_tensors: return the metrics as 0-dim tensors (no ``.tolist()``).

    Returns:
        ``(loss, metrics)``: 0-dim loss tensor (differentiable w.r.t. ``logprobs``) and a
        ``dict[str, float]`` (or ``dict[str, Tensor]``) with the keys above.

    Raises:
        ValueError: unknown ``loss_type`` or ``loss_reduction``, clip epsilons out of range,
            ``clip_ratio_c <= 1`` with ``dual_clip``, or shape mismatches (also of
            ``token_weights``).
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
    if token_weights is not None:
        _check_2d_pair("logprobs", logprobs, "token_weights", token_weights)
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

    if loss_type == "gspo":
        valid_tok = mask != 0
        seq_count = valid_tok.sum(dim=1)
        tok_log_ratio = torch.where(valid_tok, logprobs.detach() - old, 0.0)
        seq_log_ratio = tok_log_ratio.sum(dim=1) / seq_count.clamp(min=1)  # [B], no grad
        log_ratio = torch.clamp(
            logprobs - logprobs.detach() + seq_log_ratio.unsqueeze(-1), max=_GSPO_LOG_RATIO_MAX
        )
    else:
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
    if token_weights is not None:
        token_loss = token_loss * token_weights.detach()

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
        clip_active = (pg2 > pg1) & valid
        if loss_type == "gspo":
            seq_valid = valid.any(dim=1)
            n_seq = seq_valid.sum().clamp(min=1).to(torch.float32)
            clip_frac = (clip_active.any(dim=1) & seq_valid).sum() / n_seq
            r = torch.exp(seq_log_ratio.clamp(max=_GSPO_LOG_RATIO_MAX)).float()  # s_i, [B]
            r_valid = seq_valid
            r_count = n_seq
        else:
            clip_frac = clip_active.sum() / nf
            r = ratio.detach().float()
            r_valid = valid
            r_count = nf
        if loss_type == "dual_clip":
            dual_frac = ((adv < 0) & (bound < clipped) & valid).sum() / nf
        else:
            dual_frac = torch.zeros((), device=r.device)
        ratio_mean = torch.where(r_valid, r, 0.0).sum() / r_count
        ratio_max = torch.where(r_valid, r, -math.inf).amax() if r.numel() else torch.zeros((), device=r.device)
        ratio_max = torch.where(n > 0, ratio_max, 0.0)
        approx_kl = torch.where(valid, (old - logprobs.detach()).float(), 0.0).sum() / nf
        stats = torch.stack(
            [clip_frac * has, dual_frac * has, ratio_mean, ratio_max.float(), approx_kl]
        ).float()
    names = ("clip_fraction", "dual_clip_fraction", "ratio_mean", "ratio_max", "approx_kl")
    metrics = dict(zip(names, stats.unbind() if metrics_as_tensors else stats.tolist()))
    return loss, metrics


@torch.no_grad()
def tis_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    ratio_type: str = "token",
    clip_high: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance-sampling (TIS) weights correcting rollout/trainer policy mismatch.

    The rollout engine (SGLang, with its own kernels and precision) samples from a policy
    ``pi_rollout`` that differs slightly from the trainer's ``pi_old`` even with identical
    weights, so PPO/GRPO training is silently off-policy. TIS reweights each token's loss by
    the importance ratio ``pi_old / pi_rollout``, truncated from above to bound the variance
    (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training", https://fengyao.notion.site/off-policy-rl; SkyRL
    ``trainer.algorithm.off_policy_correction`` and ``compute_tis_ratio``)::

        ratio_type="token":    w_t = min(exp(old_t - rollout_t), clip_high)
        ratio_type="sequence": w_t = min(exp(sum over valid tokens of (old - rollout)), clip_high)

    The sequence ratio is the product of the token ratios, the same for every token of the
    response. Log-ratios are clamped to [-20, 20] before ``exp``. SkyRL's defaults are
    ``clip_high=2.0`` for ``token`` (``token_tis_ratio_clip_high``) and ``5.0`` for
    ``sequence`` (``sequence_tis_ratio_clip_high``). Pass the result as
    ``policy_loss(token_weights=...)``.

    Metrics (python floats over valid tokens, or over sequences with at least one valid token
    for ``sequence``; 0.0 when there is none): ``tis_ratio_mean`` and ``tis_ratio_max`` of the
    ratio *before* truncation, ``tis_truncated_fraction``: fraction with ratio > clip_high.

    Args:
        old_logprobs: ``[B, T]`` float logprobs of the sampled tokens under the trainer's
            policy before the update (``pi_old``).
        rollout_logprobs: ``[B, T]`` float logprobs reported by the rollout engine for the
            same tokens (``pi_rollout``).
        mask: ``[B, T]`` float or bool valid-token mask.
        ratio_type: ``token`` or ``sequence``.
        clip_high: truncation cap (``> 0``).

    Returns:
        ``(weights, metrics)``: ``[B, T]`` weights (dtype of ``old_logprobs`` for
        float32/float64, else float32; 0 on padding; no grad) and the metrics dict.

    Raises:
        ValueError: unknown ``ratio_type`` (the message lists the valid names),
            ``clip_high <= 0`` or shape mismatches.
    """
    if ratio_type not in TIS_RATIO_TYPES:
        raise ValueError(f"unknown TIS ratio_type {ratio_type!r}; valid names: {', '.join(TIS_RATIO_TYPES)}")
    if not clip_high > 0:
        raise ValueError(f"clip_high must be > 0, got {clip_high}")
    _check_2d_pair("old_logprobs", old_logprobs, "rollout_logprobs", rollout_logprobs)
    _check_2d_pair("old_logprobs", old_logprobs, "mask", mask)
    dtype = _float_dtype(old_logprobs)
    valid = mask != 0
    log_ratio = torch.where(valid, (old_logprobs.to(dtype) - rollout_logprobs.to(dtype)), 0.0)
    if ratio_type == "token":
        ratio = torch.exp(log_ratio.clamp(min=-_LOG_RATIO_CLAMP, max=_LOG_RATIO_CLAMP))
        unit_valid = valid
        unit_ratio = ratio
    else:
        seq_log_ratio = log_ratio.sum(dim=1).clamp(min=-_LOG_RATIO_CLAMP, max=_LOG_RATIO_CLAMP)
        unit_ratio = torch.exp(seq_log_ratio)  # [B]
        unit_valid = valid.any(dim=1)
        ratio = unit_ratio.unsqueeze(-1).expand_as(log_ratio)
    weights = torch.where(valid, ratio.clamp(max=clip_high), 0.0)
    count = unit_valid.sum()
    cf = count.clamp(min=1).to(torch.float32)
    r = unit_ratio.float()
    ratio_mean = torch.where(unit_valid, r, 0.0).sum() / cf
    ratio_max = torch.where(unit_valid, r, -math.inf).amax() if r.numel() else torch.zeros((), device=r.device)
    ratio_max = torch.where(count > 0, ratio_max, 0.0)
    truncated = ((r > clip_high) & unit_valid).sum() / cf
    stats = torch.stack([ratio_mean, ratio_max, truncated]).tolist()
    return weights, dict(zip(("tis_ratio_mean", "tis_ratio_max", "tis_truncated_fraction"), stats))


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
# reward shaping and evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def overlong_penalty(
    response_lengths: Tensor, max_response_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO soft overlong punishment: a length penalty added to the reward.

    DAPO (Yu et al. 2025, arXiv:2503.14476, eq. 13) penalizes responses that enter the last
    ``buffer_len`` tokens before the generation limit, linearly, and fully at the limit::

        L <= max - buffer:          0
        max - buffer < L <= max:    ((max - buffer) - L) / buffer * penalty_factor
        L > max:                    -penalty_factor

    so the penalty goes from 0 down to ``-penalty_factor`` at ``L = max_response_len``.
    ``buffer_len`` / ``penalty_factor`` are SkyRL's ``overlong_buffer.len`` /
    ``overlong_buffer.penalty_factor`` (verl ``overlong_buffer.len`` / ``penalty_factor``;
    DAPO used ``max=20480``, ``buffer=4096``, factor 1). Add the result to the task rewards
    before computing advantages.

    Args:
        response_lengths: ``[B]`` response lengths in tokens (any real dtype, ``>= 0``).
        max_response_len: generation limit ``max`` in tokens (``>= 1``).
        buffer_len: punishment interval in tokens, ``1 <= buffer_len <= max_response_len``.
        penalty_factor: penalty at the limit (``>= 0``).

    Returns:
        ``[B]`` float32 penalties (``<= 0``), or float64 for float64 lengths.

    Raises:
        ValueError: ``response_lengths`` not 1-D or negative, or an argument out of range
            (the message names it).
    """
    if not isinstance(response_lengths, Tensor) or response_lengths.dim() != 1:
        raise ValueError(f"response_lengths must be a 1-D [B] tensor, got {_shape_or_type(response_lengths)}")
    if isinstance(max_response_len, bool) or not isinstance(max_response_len, int) or max_response_len < 1:
        raise ValueError(f"max_response_len must be a positive int, got {max_response_len!r}")
    buffer_ok = isinstance(buffer_len, int) and not isinstance(buffer_len, bool)
    if not buffer_ok or not 1 <= buffer_len <= max_response_len:
        raise ValueError(
            f"buffer_len must be an int in [1, max_response_len={max_response_len}], got {buffer_len!r}"
        )
    if not penalty_factor >= 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    if (response_lengths < 0).any():
        raise ValueError("response_lengths must be >= 0 (tokens)")
    lengths = response_lengths.to(torch.float64 if response_lengths.dtype == torch.float64 else torch.float32)
    expected = max_response_len - buffer_len
    frac = ((lengths - expected) / buffer_len).clamp(min=0.0, max=1.0)
    return -penalty_factor * frac


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from ``n`` samples of which ``c`` are correct.

    ``pass@k = 1 - C(n - c, k) / C(n, k)``: the probability that at least one of ``k``
    samples drawn without replacement from the ``n`` is correct (Chen et al. 2021, Codex,
    arXiv:2107.03374, eq. 1). Computed as in the paper's numerically stable form,
    ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which needs no large binomials; it is 1.0
    when ``n - c < k``. Average over problems for the benchmark's pass@k.

    Args:
        n: samples per problem (``>= 1``).
        c: correct samples (``0 <= c <= n``).
        k: ``1 <= k <= n``.

    Returns:
        pass@k in ``[0, 1]`` as a python float.

    Raises:
        ValueError: a non-integer argument or one out of range (the message names it).
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")  # noqa: TRY004
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


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
