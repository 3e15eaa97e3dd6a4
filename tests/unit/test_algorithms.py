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
    informative_groups,
    overlong_penalty,
    pass_at_k,
    policy_loss,
    reinforce_pp_advantages,
    replace_flat_groups,
    rloo_advantages,
    select_informative,
    tis_weights,
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


# ------------------------------------------------------------------------------ GSPO

# token log-ratios log(pi/pi_old); the 5.0 in row 1 is padding and must not count
GSPO_LR = t([[0.3, 0.1, -0.1], [-0.5, -0.3, 5.0], [0.5, 0.3, 0.4]])
GSPO_OLD = t([[-1.0, -2.0, -0.5], [-0.3, -1.0, -2.0], [-0.7, -0.2, -1.5]])
GSPO_MASK = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
GSPO_ADV = t([1.0, -1.0, 1.0])
CLIP = {"eps_clip_low": 0.2, "eps_clip_high": 0.28}  # clip range [0.8, 1.28]
S0, S1, S2 = 1.1051709180756477, 0.6703200460356393, 1.4918246976412703  # e^0.1, e^-0.4, e^0.4


def _gspo_logprobs():
    return (GSPO_OLD + GSPO_LR).clone().requires_grad_(True)


def test_gspo_by_hand():
    # s_i = exp(mean of valid token log-ratios):
    #   row 0: (0.3+0.1-0.1)/3 = 0.1  -> s0 = 1.1051709180756477, A=+1, in [0.8, 1.28]: loss -s0
    #   row 1: (-0.5-0.3)/2   = -0.4 -> s1 = 0.6703200460356393, A=-1: max(s1, 0.8) = 0.8 (clipped)
    #   row 2: (0.5+0.3+0.4)/3 = 0.4 -> s2 = 1.4918246976412703, A=+1: max(-s2, -1.28) = -1.28 (clipped)
    # sequence_mean = (-1.1051709180756477 + 0.8 - 1.28) / 3 = -0.5283903060252159
    logp = _gspo_logprobs()
    loss, m = policy_loss(logp, GSPO_OLD, GSPO_ADV, GSPO_MASK, loss_type="gspo", loss_reduction="sequence_mean", **CLIP)
    assert_close(loss, t(-0.5283903060252159))
    assert m["clip_fraction"] == pytest.approx(2 / 3)  # rows 1 and 2 of 3 sequences
    assert m["dual_clip_fraction"] == 0.0
    assert m["ratio_mean"] == pytest.approx((S0 + S1 + S2) / 3)  # 1.0891052205841858
    assert m["ratio_max"] == pytest.approx(S2)
    # approx_kl = -mean of the 8 valid token log-ratios = -(0.3 + (-0.8) + 1.2) / 8 = -0.0875
    assert m["approx_kl"] == pytest.approx(-0.0875)
    loss.backward()
    # unclipped row 0: d/dlogp_t of (1/3) * (1/3) * sum_t(-A * s0) = -s0 / 9 per token; clipped rows: 0
    g = -S0 / 9
    assert_close(logp.grad, t([[g, g, g], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gspo_token_mean_and_token_advantages():
    # token_mean over 8 valid tokens: (3 * -s0 + 2 * 0.8 + 3 * -1.28) / 8 = -0.6944390942783678
    loss, _ = policy_loss(_gspo_logprobs(), GSPO_OLD, GSPO_ADV, GSPO_MASK, loss_type="gspo", **CLIP)
    assert_close(loss, t(-0.6944390942783678))
    adv_bt = GSPO_ADV[:, None].expand(3, 3)
    loss_bt, _ = policy_loss(_gspo_logprobs(), GSPO_OLD, adv_bt, GSPO_MASK, loss_type="gspo", **CLIP)
    assert_close(loss_bt, loss)


def test_gspo_gradient_is_the_sequence_level_objective():
    # GSPO eq. 5-7: J = mean_i(-A_i * s_i(theta)) with s_i = exp(mean_t log-ratio), unclipped here
    # (wide clip range); the token form with sequence_mean must give the same gradient.
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(3, 4, generator=g, dtype=F64)
    lr = 0.05 * torch.randn(3, 4, generator=g, dtype=F64)
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = t([0.7, -1.3, 0.4])
    logp = (old + lr).clone().requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, mask, loss_type="gspo", loss_reduction="sequence_mean",
                          eps_clip_low=0.9, eps_clip_high=10.0)
    loss.backward()
    ref_logp = (old + lr).clone().requires_grad_(True)
    s = torch.exp(((ref_logp - old) * mask).sum(1) / mask.sum(1))
    ref = (-adv * s).mean()
    ref.backward()
    assert_close(loss, ref)
    assert_close(logp.grad, ref_logp.grad)
    assert m["clip_fraction"] == 0.0


def test_gspo_ratio_clamped_and_finite():
    # log-ratios [30, 0]: mean 15, clamped to 10 -> s = e^10 > 1.28; A=+1: max(-e^10, -1.28) = -1.28
    # on both tokens, token_mean -1.28; finite loss and gradient
    old = t([[0.0, 0.0]])
    logp = t([[30.0, 0.0]]).requires_grad_(True)
    loss, m = policy_loss(logp, old, t([1.0]), t([[1.0, 1.0]]), loss_type="gspo", **CLIP)
    assert_close(loss, t(-1.28))
    assert m["ratio_max"] == pytest.approx(22026.465794806718)  # e^10
    loss.backward()
    assert torch.isfinite(logp.grad).all()


# ------------------------------------------------------------------------------ token weights / TIS

TIS_OLD = t([[-1.0, -1.5, -0.5], [-0.2, -0.4, -9.0]])
TIS_ROLLOUT = t([[-1.5, -1.0, -1.5], [-0.2, -0.1, 0.0]])
TIS_MASK = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
E05, EM05, E1, EM03 = 1.6487212707001282, 0.6065306597126334, 2.718281828459045, 0.7408182206817179


def test_tis_token_by_hand():
    # log-ratios old - rollout: row 0 [0.5, -0.5, 1.0], row 1 [0.0, -0.3, (pad)]
    # ratios [e^0.5, e^-0.5, e^1], [1, e^-0.3]; cap 2 truncates e^1 = 2.718 -> 2.0
    w, m = tis_weights(TIS_OLD, TIS_ROLLOUT, TIS_MASK, "token", clip_high=2.0)
    assert_close(w, t([[E05, EM05, 2.0], [1.0, EM03, 0.0]]))
    assert not w.requires_grad
    # mean of the 5 untruncated ratios = (1.6487 + 0.6065 + 2.7183 + 1 + 0.7408) / 5 = 1.342870395910705
    assert m["tis_ratio_mean"] == pytest.approx(1.342870395910705)
    assert m["tis_ratio_max"] == pytest.approx(E1)
    assert m["tis_truncated_fraction"] == pytest.approx(1 / 5)


def test_tis_sequence_by_hand():
    # row 0: sum of log-ratios 0.5 - 0.5 + 1.0 = 1.0 -> e^1 -> capped 2.0 ; row 1: -0.3 -> e^-0.3
    w, m = tis_weights(TIS_OLD, TIS_ROLLOUT, TIS_MASK, "sequence", clip_high=2.0)
    assert_close(w, t([[2.0, 2.0, 2.0], [EM03, EM03, 0.0]]))
    assert m["tis_ratio_mean"] == pytest.approx((E1 + EM03) / 2)  # 1.7295500245703814
    assert m["tis_ratio_max"] == pytest.approx(E1)
    assert m["tis_truncated_fraction"] == pytest.approx(1 / 2)
    w5, m5 = tis_weights(TIS_OLD, TIS_ROLLOUT, TIS_MASK, "sequence", clip_high=5.0)
    assert_close(w5, t([[E1, E1, E1], [EM03, EM03, 0.0]]))
    assert m5["tis_truncated_fraction"] == 0.0


def test_tis_empty_mask_and_errors():
    w, m = tis_weights(TIS_OLD, TIS_ROLLOUT, torch.zeros(2, 3), "token")
    assert_close(w, torch.zeros(2, 3, dtype=F64))
    assert m == {"tis_ratio_mean": 0.0, "tis_ratio_max": 0.0, "tis_truncated_fraction": 0.0}
    with pytest.raises(ValueError, match="unknown TIS ratio_type 'geometric'; valid names: token, sequence"):
        tis_weights(TIS_OLD, TIS_ROLLOUT, TIS_MASK, "geometric")
    with pytest.raises(ValueError, match="clip_high must be > 0, got 0.0"):
        tis_weights(TIS_OLD, TIS_ROLLOUT, TIS_MASK, clip_high=0.0)
    with pytest.raises(ValueError, match="old_logprobs and rollout_logprobs must have the same shape"):
        tis_weights(TIS_OLD, TIS_ROLLOUT[:, :2], TIS_MASK)


# same setup as tests/unit/test_grpo.py: ratios row 0 (A=+1) 0.5, 1.1, 1.5; row 1 (A=-1) 0.5, 1.1, 4.0
PL_RATIOS = t([[0.5, 1.1, 1.5], [0.5, 1.1, 4.0]])
PL_OLD = t([[-1.0, -2.0, -0.5], [-0.3, -1.0, -2.0]])
PL_ADV = t([1.0, -1.0])
ONES = torch.ones(2, 3, dtype=F64)


def _pl_logprobs():
    return (PL_OLD + PL_RATIOS.log()).clone().requires_grad_(True)


def test_policy_loss_token_weights_by_hand():
    # unweighted token losses: row 0 [-0.5, -1.1, -1.28 (clipped)], row 1 [0.8 (clipped), 1.1, 4.0]
    # weights [[2, 1, 0.5], [1, 1, 1]]: [-1.0, -1.1, -0.64, 0.8, 1.1, 4.0], sum 3.16, token_mean 3.16/6
    weights = t([[2.0, 1.0, 0.5], [1.0, 1.0, 1.0]]).requires_grad_(True)
    logp = _pl_logprobs()
    loss, m = policy_loss(logp, PL_OLD, PL_ADV, ONES, token_weights=weights, **CLIP)
    assert_close(loss, t(3.16 / 6))
    assert m["clip_fraction"] == pytest.approx(2 / 6)  # weights do not change the metrics
    loss.backward()
    # d/dlogp (-A r w)/6 where unclipped: row 0 [-0.5*2/6, -1.1/6, 0], row 1 [0, 1.1/6, 4.0/6]
    assert_close(logp.grad, t([[-1.0 / 6, -1.1 / 6, 0.0], [0.0, 1.1 / 6, 4.0 / 6]]))
    assert weights.grad is None  # detached


def test_policy_loss_weights_none_and_ones_equal_unweighted():
    base, base_m = policy_loss(_pl_logprobs(), PL_OLD, PL_ADV, ONES, loss_type="dual_clip", **CLIP)
    ones, ones_m = policy_loss(_pl_logprobs(), PL_OLD, PL_ADV, ONES, loss_type="dual_clip", token_weights=ONES, **CLIP)
    assert torch.equal(base, ones) and base_m == ones_m
    # dual clip bound (3.0 on the r=4.0 token) applies before the weight: 0.5 * 3.0 = 1.5
    w = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.5]])
    loss, _ = policy_loss(_pl_logprobs(), PL_OLD, PL_ADV, ONES, loss_type="dual_clip", token_weights=w, **CLIP)
    assert_close(loss, t((-0.5 - 1.1 - 1.28 + 0.8 + 1.1 + 1.5) / 6))
    with pytest.raises(ValueError, match="logprobs and token_weights must have the same shape"):
        policy_loss(_pl_logprobs(), PL_OLD, PL_ADV, ONES, token_weights=PL_ADV[:, None], **CLIP)


def test_policy_loss_with_tis_weights_end_to_end():
    # token TIS weights from test_tis_token_by_hand, times the unweighted token losses:
    # row 0: -0.5*e^0.5 - 1.1*e^-0.5 - 1.28*2 ; row 1: 0.8*1 + 1.1*e^-0.3 + 4.0*0 (padding weight 0,
    # token still valid in the loss mask)
    w, _ = tis_weights(TIS_OLD, TIS_ROLLOUT, TIS_MASK, "token", clip_high=2.0)
    loss, _ = policy_loss(_pl_logprobs(), PL_OLD, PL_ADV, ONES, token_weights=w, **CLIP)
    expected = (-0.5 * E05 - 1.1 * EM05 - 2.56 + 0.8 + 1.1 * EM03) / 6
    assert_close(loss, t(expected))


# ------------------------------------------------------------------------------ overlong penalty


def test_overlong_penalty_by_hand():
    # max 10, buffer 4 -> free up to 6 tokens; then (6 - L)/4: L=7 -> -0.25, L=9 -> -0.75,
    # L=10 -> -1.0; beyond the limit (L=12) -> -1.0 (DAPO eq. 13)
    lengths = torch.tensor([3, 6, 7, 9, 10, 12])
    assert_close(overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0, -1.0]))
    # penalty_factor 0.5 halves it; float64 lengths keep float64
    assert_close(overlong_penalty(lengths.double(), 10, 4, 0.5), t([0.0, 0.0, -0.125, -0.375, -0.5, -0.5]))
    # buffer = max: linear over the whole range, L=5 of 10 -> (0 - 5)/10 = -0.5
    assert_close(overlong_penalty(torch.tensor([0, 5]), 10, 10), torch.tensor([0.0, -0.5]))


def test_overlong_penalty_errors():
    lengths = torch.tensor([3, 6])
    with pytest.raises(ValueError, match=r"buffer_len must be an int in \[1, max_response_len=10\], got 11"):
        overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match=r"buffer_len must be an int in \[1, max_response_len=10\], got 0"):
        overlong_penalty(lengths, 10, 0)
    with pytest.raises(ValueError, match="max_response_len must be a positive int, got 0"):
        overlong_penalty(lengths, 0, 1)
    with pytest.raises(ValueError, match="penalty_factor must be >= 0, got -1.0"):
        overlong_penalty(lengths, 10, 4, -1.0)
    with pytest.raises(ValueError, match=r"response_lengths must be >= 0 \(tokens\)"):
        overlong_penalty(torch.tensor([-1]), 10, 4)
    with pytest.raises(ValueError, match=r"response_lengths must be a 1-D \[B\] tensor, got \(1, 2\)"):
        overlong_penalty(torch.tensor([[1, 2]]), 10, 4)


# ------------------------------------------------------------------------------ dynamic sampling

# groups of 2: [1,0] informative, [1,1] flat, [0,1] informative, [0,0] flat
DS_REWARDS = t([1, 0, 1, 1, 0, 1, 0, 0])


def test_informative_groups_and_select():
    assert informative_groups(DS_REWARDS, 2).tolist() == [True, False, True, False]
    # samples of groups 0 and 2: indices 0,1 and 4,5
    idx = select_informative(DS_REWARDS, 2)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [0, 1, 4, 5]
    assert select_informative(t([1, 1, 0, 0]), 2).tolist() == []
    assert select_informative(t([1.0, 0.0]), 1).tolist() == []  # singleton groups never informative
    with pytest.raises(ValueError, match=r"number of rewards \(3\) is not divisible by group_size \(2\)"):
        select_informative(t([1.0, 0.0, 1.0]), 2)


def test_replace_flat_groups_single_donor_by_hand():
    # groups of 3: [1,0,0] informative, [1,1,1] flat, [0,0,0] flat -> only donor is group 0,
    # 1 donor < 2 flat groups -> drawn with repetition, necessarily group 0 twice
    r = t([1, 0, 0, 1, 1, 1, 0, 0, 0])
    idx = replace_flat_groups(r, 3, torch.Generator().manual_seed(0))
    assert idx.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert_close(r[idx], t([1, 0, 0, 1, 0, 0, 1, 0, 0]))


def test_replace_flat_groups_without_repetition_when_enough_donors():
    # 2 donors (groups 0, 2) for 2 flat groups (1, 3): a permutation, so both donors are used once
    for seed in range(5):
        idx = replace_flat_groups(DS_REWARDS, 2, torch.Generator().manual_seed(seed))
        assert idx[[0, 1, 4, 5]].tolist() == [0, 1, 4, 5]  # informative groups keep their samples
        donors = sorted([idx[2].item() // 2, idx[6].item() // 2])
        assert donors == [0, 2]
        assert idx[3].item() == idx[2].item() + 1 and idx[7].item() == idx[6].item() + 1
        assert informative_groups(DS_REWARDS[idx], 2).all()
    a = replace_flat_groups(DS_REWARDS, 2, torch.Generator().manual_seed(7))
    b = replace_flat_groups(DS_REWARDS, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_replace_flat_groups_identity_cases():
    assert replace_flat_groups(t([1, 1, 0, 0]), 2).tolist() == [0, 1, 2, 3]  # no donor
    assert replace_flat_groups(t([1, 0, 0, 1]), 2).tolist() == [0, 1, 2, 3]  # nothing flat


# ------------------------------------------------------------------------------ pass@k


def test_pass_at_k_by_hand():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # k=1 is the fraction correct: 3/8
    assert pass_at_k(8, 3, 1) == pytest.approx(0.375)
    # n - c < k: every draw of k contains a correct sample
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 0, 4) == 0.0
    # large n: 1 - C(199,100)/C(200,100) = 1 - 100/200 = 0.5 (binomials ~1e58, no overflow)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    # n=1000, c=500, k=500: C(500,500)/C(1000,500) ~ 3.7e-300 -> 1.0
    assert pass_at_k(1000, 500, 500) == pytest.approx(1.0)


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match=r"k must be in \[1, n=5\], got 6"):
        pass_at_k(5, 2, 6)
    with pytest.raises(ValueError, match=r"c must be in \[0, n=5\], got 7"):
        pass_at_k(5, 7, 1)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="k must be an int, got 2.0"):
        pass_at_k(5, 2, 2.0)
