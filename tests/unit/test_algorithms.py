"""Unit tests for the RL algorithm variants in rlctl.grpo (RLOO, REINFORCE++, GSPO, truncated
importance sampling, overlong penalty, dynamic-sampling helpers, pass@k).

Hand-computed expected values (the arithmetic is in the comments), CPU only, well under a second.

Run: pytest tests/unit/test_algorithms.py -q
"""

import pytest
import torch
from torch.testing import assert_close

from rlctl.grpo import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------------------ RLOO


def test_rloo_by_hand():
    # group [1,0,0,1]: sum 2; A_i = r_i - (2 - r_i)/3 -> 1 - 1/3 = 2/3 ; 0 - 2/3 = -2/3
    # group [1,2,3,6]: sum 12; A_i = (4 r_i - 12)/3 -> -8/3, -4/3, 0, 4  (6 - (1+2+3)/3 = 4)
    adv = rloo_advantages(t([1, 0, 0, 1, 1, 2, 3, 6]), group_size=4)
    assert_close(adv, t([2 / 3, -2 / 3, -2 / 3, 2 / 3, -8 / 3, -4 / 3, 0.0, 4.0]))


def test_rloo_group_of_two_and_singletons():
    # n=2: A = r_i - r_other -> [1-0, 0-1]; flat group [1,1] -> 0
    assert_close(rloo_advantages(t([1.0, 0.0, 1.0, 1.0]), 2), t([1.0, -1.0, 0.0, 0.0]))
    assert_close(rloo_advantages(t([3.0, 5.0]), 1), t([0.0, 0.0]))
    adv = rloo_advantages(torch.tensor([True, False]), 2)
    assert adv.dtype == torch.float32
    assert_close(adv, torch.tensor([1.0, -1.0]))


def test_rloo_errors():
    with pytest.raises(ValueError, match=r"number of rewards \(3\) is not divisible by group_size \(2\)"):
        rloo_advantages(t([0.0, 1.0, 2.0]), 2)


# ------------------------------------------------------------------------------ REINFORCE++


def test_reinforce_pp_sequence_weighted_by_hand():
    # r = [1,0,0,1, 1,1,1,0]: mean 5/8 = 0.625; deviations +0.375 (x5), -0.625 (x3)
    # sum of squares = 5*0.140625 + 3*0.390625 = 1.875; unbiased var = 1.875/7 = 0.26785714285714285
    # A = dev / sqrt(var + 1e-8): +0.7245688237841874, -1.2076147063069789
    a, b = 0.7245688237841874, -1.2076147063069789
    adv = reinforce_pp_advantages(t([1, 0, 0, 1, 1, 1, 1, 0]), group_size=4)
    assert_close(adv, t([a, b, b, a, a, a, a, b]))


def test_reinforce_pp_token_weighted_by_hand():
    # r = [1, 0] with 3 and 1 response tokens: token returns [1,1,1,0], N = 4, mean 0.75
    # sum of squares = 3*0.0625 + 0.5625 = 0.75; var = 0.75/3 = 0.25
    # A = [0.25, -0.75] / sqrt(0.25 + 1e-8) = [0.49999999000..., -1.49999997000...]
    adv = reinforce_pp_advantages(t([1.0, 0.0]), 2, response_lengths=torch.tensor([3, 1]))
    assert_close(adv, t([0.4999999900000003, -1.4999999700000008]))


def test_reinforce_pp_matches_token_level_whitening():
    # The SkyRL/verl definition: returns [B, T] = r_i on valid tokens, masked_whiten over valid
    # tokens (masked mean, unbiased masked var, (x - mean) * rsqrt(var + 1e-8)).
    r = t([0.5, 2.0, -1.0, 0.0, 3.0, 1.0])
    lengths = torch.tensor([4, 1, 3, 0, 2, 5])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).to(F64)
    returns = r[:, None] * mask
    n = mask.sum()
    mean = returns.sum() / n
    var = (((returns - mean) ** 2) * mask).sum() / n * n / (n - 1)
    ref = ((returns - mean) * torch.rsqrt(var + 1e-8))[:, 0]
    adv = reinforce_pp_advantages(r, 3, response_lengths=lengths)
    keep = lengths > 0  # the length-0 response has no token in the reference
    assert_close(adv[keep], ref[keep])


def test_reinforce_pp_group_baseline_by_hand():
    # group means 0.5 and 0.75 -> centered [.5,-.5,-.5,.5, .25,.25,.25,-.75]; batch mean 0
    # sum of squares = 4*0.25 + 3*0.0625 + 0.5625 = 1.75; var = 1.75/7 = 0.25
    # A = centered / sqrt(0.25 + 1e-8) = 2 * centered * (1 - 2e-8)
    adv = reinforce_pp_advantages(t([1, 0, 0, 1, 1, 1, 1, 0]), 4, group_baseline=True)
    s = 0.9999999800000006  # 0.5 / sqrt(0.25 + 1e-8)
    assert_close(adv, t([1, -1, -1, 1, 0.5, 0.5, 0.5, -1.5]) * s)


def test_reinforce_pp_degenerate_batches_are_zero():
    assert_close(reinforce_pp_advantages(t([2.0]), 1), t([0.0]))  # N = 1: no variance
    assert_close(reinforce_pp_advantages(t([1.0, 1.0, 1.0]), 1), t([0.0, 0.0, 0.0]))  # var 0
    assert_close(reinforce_pp_advantages(t([1.0, 0.0]), 1, response_lengths=torch.tensor([1, 0])), t([0.0, 0.0]))


def test_reinforce_pp_errors():
    with pytest.raises(ValueError, match=r"response_lengths must be a \[B\] tensor with B=2, got \(3,\)"):
        reinforce_pp_advantages(t([1.0, 0.0]), 2, response_lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"response_lengths must be >= 0 \(tokens\)"):
        reinforce_pp_advantages(t([1.0, 0.0]), 2, response_lengths=torch.tensor([1, -2]))
    with pytest.raises(ValueError, match="eps must be >= 0, got -1.0"):
        reinforce_pp_advantages(t([1.0, 0.0]), 2, eps=-1.0)


# ------------------------------------------------------------------------------ dispatcher


def test_compute_advantages_dispatches():
    r = t([1, 0, 0, 1, 1, 2, 3, 6])
    assert list(ADVANTAGE_ESTIMATORS) == ["grpo", "rloo", "reinforce++"]
    assert_close(compute_advantages("rloo", r, 4), rloo_advantages(r, 4))
    assert_close(compute_advantages("grpo", r, 4, norm_by_std=False), grpo_advantages(r, 4, norm_by_std=False))
    assert_close(
        compute_advantages("reinforce++", r, 4, group_baseline=True),
        reinforce_pp_advantages(r, 4, group_baseline=True),
    )


def test_compute_advantages_errors():
    r = t([1.0, 0.0])
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; valid names: grpo, rloo, reinforce\\+\\+"):
        compute_advantages("ppo", r, 2)
    with pytest.raises(ValueError, match="advantage estimator 'rloo' takes no argument 'norm_by_std'; accepted: none"):
        compute_advantages("rloo", r, 2, norm_by_std=False)
    with pytest.raises(
        ValueError,
        match="advantage estimator 'grpo' takes no argument 'group_baseline'; accepted: norm_by_std, eps",
    ):
        compute_advantages("grpo", r, 2, group_baseline=True)
