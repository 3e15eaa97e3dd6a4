"""Unit tests for rlctl.grpo: hand-computed expected values, CPU only, well under a second.

Run: pytest tests/unit/test_grpo.py -q
"""

import math

import pytest
import torch
from torch.testing import assert_close

from rlctl.grpo import (
    combine_losses,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    logprobs_from_logits,
    masked_reduce,
    policy_loss,
    zero_variance_groups,
    zero_variance_sample_mask,
)

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------------------ advantages


def test_grpo_advantages_std_normalized_by_hand():
    # group 0 = [1,0,0,1]: mean 0.5, deviations +-0.5,
    #   unbiased var = 4 * 0.25 / (4 - 1) = 1/3, std = sqrt(1/3) = 0.5773502691896258
    #   A = +-0.5 / (0.5773502691896258 + 1e-6) = +-0.8660239037870368
    # group 1 = [1,1,1,1]: mean 1, std 0 -> A = 0 / (0 + 1e-6) = 0
    adv = grpo_advantages(t([1, 0, 0, 1, 1, 1, 1, 1]), group_size=4)
    a = 0.8660239037870368
    assert_close(adv, t([a, -a, -a, a, 0, 0, 0, 0]))


def test_grpo_advantages_uneven_rewards_by_hand():
    # group [1,2,3,6]: mean 3, deviations -2,-1,0,3; unbiased var = (4+1+0+9)/3 = 14/3,
    # std = 2.160246899469287; A = dev / (std + 1e-6)
    adv = grpo_advantages(t([1.0, 2.0, 3.0, 6.0]), group_size=4)
    assert_close(adv, t([-0.9258196712013211, -0.46290983560066057, 0.0, 1.3887295068019816]))


def test_grpo_advantages_dr_grpo_no_std():
    # Dr. GRPO: A = r - mean; group 0 mean 0.5, group 1 mean (2+4)/2 = 3
    adv = grpo_advantages(t([1, 0, 0, 1, 2, 4, 3, 3]), group_size=4, norm_by_std=False)
    assert_close(adv, t([0.5, -0.5, -0.5, 0.5, -1.0, 1.0, 0.0, 0.0]))


def test_grpo_advantages_group_size_one_is_zero():
    adv = grpo_advantages(t([1.0, 0.0, 5.0]), group_size=1)
    assert_close(adv, t([0.0, 0.0, 0.0]))


def test_grpo_advantages_int_rewards_float32_no_grad():
    r = torch.tensor([1, 0, 1, 1])
    adv = grpo_advantages(r, group_size=2, norm_by_std=False)
    assert adv.dtype == torch.float32
    assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    rg = torch.tensor([1.0, 0.0], requires_grad=True)
    assert not grpo_advantages(rg, 2).requires_grad


def test_grpo_advantages_errors():
    with pytest.raises(ValueError, match=r"number of rewards \(6\) is not divisible by group_size \(4\)"):
        grpo_advantages(t([0.0] * 6), group_size=4)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        grpo_advantages(t([0.0] * 4), group_size=0)
    with pytest.raises(ValueError, match=r"rewards must be 1-D \[B\]"):
        grpo_advantages(t([[0.0, 1.0]]), group_size=1)


# ------------------------------------------------------------------------------ zero variance


def test_zero_variance_groups_and_mask():
    r = t([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    zv = zero_variance_groups(r, 4)
    assert zv.dtype == torch.bool
    assert zv.tolist() == [False, True, True]
    # metric: fraction of groups with zero reward variance = 2 / 3
    assert_close(zv.float().mean(), torch.tensor(2 / 3))
    keep = zero_variance_sample_mask(r, 4)
    assert keep.dtype == torch.float32
    assert_close(keep, torch.tensor([1.0] * 4 + [0.0] * 8))


def test_zero_variance_exact_equality_and_bool_rewards():
    assert zero_variance_groups(t([0.5, 0.5 + 1e-9]), 2).tolist() == [False]
    assert zero_variance_groups(torch.tensor([True, True, True, False]), 2).tolist() == [True, False]
    with pytest.raises(ValueError, match="not divisible by group_size"):
        zero_variance_sample_mask(t([0.0] * 5), 2)


# ------------------------------------------------------------------------------ KL


# logp - ref = [0.5, -1.0, 0.0]
LOGP = t([[0.0, -1.0, -0.5]])
REF = t([[-0.5, 0.0, -0.5]])


def test_kl_k1_k2_abs_by_hand():
    assert_close(kl_penalty(LOGP, REF, "k1"), t([[0.5, -1.0, 0.0]]))
    # 0.5 * d^2: 0.5*0.25, 0.5*1, 0
    assert_close(kl_penalty(LOGP, REF, "k2"), t([[0.125, 0.5, 0.0]]))
    assert_close(kl_penalty(LOGP, REF, "abs"), t([[0.5, 1.0, 0.0]]))


def test_kl_k3_by_hand():
    # k3 = exp(ref - logp) - (ref - logp) - 1, with d = logp - ref:
    #   d=0.5:  exp(-0.5) + 0.5 - 1 = 0.6065306597126334 - 0.5 = 0.10653065971263342
    #   d=-1.0: exp(1) - 1 - 1      = 2.718281828459045 - 2  = 0.7182818284590451
    #   d=0:    1 - 0 - 1 = 0
    assert_close(kl_penalty(LOGP, REF, "k3"), t([[0.10653065971263342, 0.7182818284590451, 0.0]]))


def test_kl_k3_clamped_to_10_and_aliases():
    # d = logp - ref = -30 -> exp(20 after clamp) - 20 - 1 >> 10 -> 10
    # d = +30 -> exp(-20) + 20 - 1 ~= 19 -> 10
    out = kl_penalty(t([[-30.0, 30.0]]), t([[0.0, 0.0]]), "k3")
    assert_close(out, t([[10.0, 10.0]]))
    assert torch.isfinite(out).all()
    for alias, name in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        assert_close(kl_penalty(LOGP, REF, alias), kl_penalty(LOGP, REF, name))


def test_kl_gradient_flows_to_logprobs():
    logp = LOGP.clone().requires_grad_(True)
    kl_penalty(logp, REF, "k2").sum().backward()
    # d/dlogp 0.5*(logp-ref)^2 = logp - ref
    assert_close(logp.grad, t([[0.5, -1.0, 0.0]]))


def test_kl_errors():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; valid names: k1, k2, k3, abs"):
        kl_penalty(LOGP, REF, "k4")
    with pytest.raises(ValueError, match="must have the same shape"):
        kl_penalty(LOGP, REF[:, :2], "k1")


# ------------------------------------------------------------------------------ reductions

VALS = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_reduce_token_mean_by_hand():
    # (1 + 2 + 4) / 3 valid tokens
    assert_close(masked_reduce(VALS, MASK, "token_mean"), t(7 / 3))
    # mini-batch total of 10 tokens: 7 / 10
    assert_close(masked_reduce(VALS, MASK, "token_mean", num_tokens=10), t(0.7))
    # bool mask gives the same result
    assert_close(masked_reduce(VALS, MASK.bool(), "token_mean"), t(7 / 3))


def test_reduce_sequence_mean_by_hand():
    # seq 0: (1+2)/2 = 1.5; seq 1: 4/1 = 4; mean over 2 seqs = 2.75
    assert_close(masked_reduce(VALS, MASK, "sequence_mean"), t(2.75))
    # mini-batch of 4 sequences: (1.5 + 4) / 4
    assert_close(masked_reduce(VALS, MASK, "sequence_mean", num_sequences=4), t(1.375))


def test_reduce_seq_mean_token_sum_norm_by_hand():
    # default max_response_len = T = 3: (3/3 + 4/3) / 2 = 7/6
    assert_close(masked_reduce(VALS, MASK, "seq_mean_token_sum_norm"), t(7 / 6))
    # max_response_len 4: (3/4 + 4/4) / 2 = 0.875; with num_sequences 4: 1.75 / 4 = 0.4375
    assert_close(masked_reduce(VALS, MASK, "seq_mean_token_sum_norm", max_response_len=4), t(0.875))
    assert_close(
        masked_reduce(VALS, MASK, "seq_mean_token_sum_norm", max_response_len=4, num_sequences=4),
        t(0.4375),
    )


def test_reduce_ignores_nan_in_padding():
    vals = t([[1.0, float("nan")], [float("inf"), 3.0]])
    mask = t([[1.0, 0.0], [0.0, 1.0]])
    for red, expected in (("token_mean", 2.0), ("sequence_mean", 2.0), ("seq_mean_token_sum_norm", 1.0)):
        assert_close(masked_reduce(vals, mask, red), t(expected))


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("split", [2, 1])
def test_reduce_micro_batches_sum_to_full_batch(reduction, split):
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(4, 5, generator=g, dtype=F64)
    mask = (torch.rand(4, 5, generator=g) > 0.4).to(F64)
    mask[:, 0] = 1.0
    mask[2] = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])  # uneven lengths across the split
    totals = dict(num_sequences=4, num_tokens=float(mask.sum()), max_response_len=7)
    full = masked_reduce(vals, mask, reduction, **totals)
    parts = [
        masked_reduce(vals[:split], mask[:split], reduction, **totals),
        masked_reduce(vals[split:], mask[split:], reduction, **totals),
    ]
    assert_close(parts[0] + parts[1], full)
    # and with own denominators the full batch matches the plain definition
    if reduction == "token_mean":
        assert_close(masked_reduce(vals, mask, reduction), (vals * mask).sum() / mask.sum())


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "seq_mean_token_sum_norm"])
def test_reduce_zero_tokens_is_zero_not_nan(reduction):
    vals = torch.randn(2, 3, dtype=F64, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=F64)
    out = masked_reduce(vals, mask, reduction)
    assert_close(out, t(0.0))
    out.backward()
    assert_close(vals.grad, torch.zeros(2, 3, dtype=F64))
    assert_close(masked_reduce(vals, mask, reduction, num_tokens=0, num_sequences=4), t(0.0))


def test_reduce_errors():
    with pytest.raises(
        ValueError,
        match="unknown loss_reduction 'mean'; valid names: token_mean, sequence_mean, seq_mean_token_sum_norm",
    ):
        masked_reduce(VALS, MASK, "mean")
    with pytest.raises(ValueError, match="values and mask must have the same shape"):
        masked_reduce(VALS, MASK[:, :2], "token_mean")
    with pytest.raises(ValueError, match="num_sequences must be >= 1"):
        masked_reduce(VALS, MASK, "sequence_mean", num_sequences=0)
    with pytest.raises(ValueError, match="max_response_len must be >= 1"):
        masked_reduce(VALS, MASK, "seq_mean_token_sum_norm", max_response_len=0)


# ------------------------------------------------------------------------------ policy loss

# ratios: row 0 (A = +1): 0.5, 1.1, 1.5   row 1 (A = -1): 0.5, 1.1, 4.0
RATIOS = t([[0.5, 1.1, 1.5], [0.5, 1.1, 4.0]])
OLD = t([[-1.0, -2.0, -0.5], [-0.3, -1.0, -2.0]])
ADV = t([1.0, -1.0])
ONES = torch.ones(2, 3, dtype=F64)
CLIP = dict(eps_clip_low=0.2, eps_clip_high=0.28)  # clip range [0.8, 1.28]


def _new_logprobs():
    return (OLD + RATIOS.log()).clone().requires_grad_(True)


def test_policy_loss_regular_by_hand():
    # A=+1: r=0.5 -> max(-0.5, -0.8) = -0.5 ; r=1.1 -> -1.1 ; r=1.5 -> max(-1.5, -1.28) = -1.28 (clipped)
    # A=-1: r=0.5 -> max(0.5, 0.8) = 0.8 (clipped) ; r=1.1 -> 1.1 ; r=4.0 -> max(4.0, 1.28) = 4.0
    # token_mean = (-0.5 - 1.1 - 1.28 + 0.8 + 1.1 + 4.0) / 6 = 3.02 / 6
    logp = _new_logprobs()
    loss, m = policy_loss(logp, OLD, ADV, ONES, **CLIP)
    assert_close(loss, t(0.5033333333333333))
    assert m["clip_fraction"] == pytest.approx(2 / 6)
    assert m["dual_clip_fraction"] == 0.0
    assert m["ratio_mean"] == pytest.approx(8.7 / 6)  # (0.5+1.1+1.5+0.5+1.1+4.0)/6 = 1.45
    assert m["ratio_max"] == pytest.approx(4.0)
    # approx_kl = mean(old - new) = -mean(log r) = -log(0.25 * 1.21 * 1.5 * 4) / 6
    assert m["approx_kl"] == pytest.approx(-0.09934757795280234)
    assert all(isinstance(v, float) for v in m.values())
    loss.backward()
    # d/dlogp (-A r)/6 = -A r / 6 where unclipped, 0 where clipped
    assert_close(logp.grad, t([[-0.5 / 6, -1.1 / 6, 0.0], [0.0, 1.1 / 6, 4.0 / 6]]))


def test_policy_loss_dual_clip_by_hand():
    # as above, but A=-1, r=4.0: min(4.0, -A*c = 3.0) = 3.0 (dual clip active)
    # token_mean = (-0.5 - 1.1 - 1.28 + 0.8 + 1.1 + 3.0) / 6 = 2.02 / 6
    logp = _new_logprobs()
    loss, m = policy_loss(logp, OLD, ADV, ONES, loss_type="dual_clip", clip_ratio_c=3.0, **CLIP)
    assert_close(loss, t(0.33666666666666667))
    assert m["clip_fraction"] == pytest.approx(2 / 6)
    assert m["dual_clip_fraction"] == pytest.approx(1 / 6)
    loss.backward()
    assert_close(logp.grad, t([[-0.5 / 6, -1.1 / 6, 0.0], [0.0, 1.1 / 6, 0.0]]))


def test_policy_loss_metrics_as_tensors_match_the_floats():
    """metrics_as_tensors=True: the same values as 0-dim float32 tensors (no host sync), same loss."""
    loss_f, mf = policy_loss(_new_logprobs(), OLD, ADV, ONES, loss_type="dual_clip", clip_ratio_c=3.0, **CLIP)
    loss_t, mt = policy_loss(_new_logprobs(), OLD, ADV, ONES, loss_type="dual_clip", clip_ratio_c=3.0,
                             metrics_as_tensors=True, **CLIP)
    assert_close(loss_t, loss_f)
    assert mt.keys() == mf.keys()
    for k, v in mt.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad, k
        assert v.item() == pytest.approx(mf[k], rel=1e-6), k
    assert mt["clip_fraction"].item() == pytest.approx(2 / 6) and mt["dual_clip_fraction"].item() == pytest.approx(1 / 6)


def test_policy_loss_symmetric_clip_and_mask():
    # eps 0.2/0.2: A=+1, r=1.5 -> max(-1.5, -1.2) = -1.2; mask out the r=4.0 token:
    # token_mean over 5 = (-0.5 - 1.1 - 1.2 + 0.8 + 1.1) / 5 = -0.9 / 5 = -0.18
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, m = policy_loss(_new_logprobs(), OLD, ADV, mask, eps_clip_low=0.2, eps_clip_high=0.2)
    assert_close(loss, t(-0.18))
    assert m["clip_fraction"] == pytest.approx(2 / 5)
    assert m["ratio_max"] == pytest.approx(1.5)


def test_policy_loss_token_advantages_match_broadcast():
    a = policy_loss(_new_logprobs(), OLD, ADV, ONES, **CLIP)[0]
    b = policy_loss(_new_logprobs(), OLD, ADV[:, None].expand(2, 3), ONES, **CLIP)[0]
    assert_close(a, b)


def test_policy_loss_passes_reduction_and_totals():
    # sequence_mean with num_sequences=4: row sums -2.88 / 3 and 5.9 / 3, summed / 4
    loss, _ = policy_loss(
        _new_logprobs(), OLD, ADV, ONES, loss_reduction="sequence_mean", num_sequences=4, **CLIP
    )
    assert_close(loss, t((-2.88 / 3 + 5.9 / 3) / 4))
    # token_mean with num_tokens=12: 3.02 / 12
    loss, _ = policy_loss(_new_logprobs(), OLD, ADV, ONES, num_tokens=12, **CLIP)
    assert_close(loss, t(3.02 / 12))


def test_policy_loss_no_valid_tokens():
    logp = _new_logprobs()
    loss, m = policy_loss(logp, OLD, ADV, torch.zeros(2, 3, dtype=F64), **CLIP)
    assert_close(loss, t(0.0))
    assert m == {"clip_fraction": 0.0, "dual_clip_fraction": 0.0, "ratio_mean": 0.0, "ratio_max": 0.0, "approx_kl": 0.0}
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_policy_loss_errors():
    logp = _new_logprobs()
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1 for dual_clip, got 1.0"):
        policy_loss(logp, OLD, ADV, ONES, loss_type="dual_clip", clip_ratio_c=1.0, **CLIP)
    with pytest.raises(ValueError, match="unknown policy loss_type 'cispo'; valid names: regular, dual_clip, gspo"):
        policy_loss(logp, OLD, ADV, ONES, loss_type="cispo", **CLIP)
    with pytest.raises(ValueError, match=r"eps_clip_low must be in \[0, 1\)"):
        policy_loss(logp, OLD, ADV, ONES, eps_clip_low=1.0, eps_clip_high=0.2)
    with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\]"):
        policy_loss(logp, OLD, ADV[:, None], ONES, **CLIP)
    with pytest.raises(ValueError, match="unknown loss_reduction"):
        policy_loss(logp, OLD, ADV, ONES, loss_reduction="sum", **CLIP)


def test_combine_losses():
    # 1.0 + 0.1 * 0.5 - 0.01 * 2.0 = 1.03
    out = combine_losses(t(1.0), kl=t(0.5), kl_coef=0.1, entropy=t(2.0), entropy_coef=0.01)
    assert_close(out, t(1.03))
    assert_close(combine_losses(t(1.0)), t(1.0))
    with pytest.raises(ValueError, match="kl_coef=0.1 is nonzero but kl is None"):
        combine_losses(t(1.0), kl_coef=0.1)


# ------------------------------------------------------------------------------ logits


def test_entropy_uniform_is_log_v_and_peaked_is_zero():
    assert_close(entropy_from_logits(torch.zeros(2, 3, 7, dtype=F64)), torch.full((2, 3), math.log(7), dtype=F64))
    peaked = t([[[100.0, 0.0, 0.0, 0.0]]])
    assert_close(entropy_from_logits(peaked), t([[0.0]]), atol=1e-40, rtol=0)  # e^-100 terms underflow
    # two-way [0, ln 3]: p = [1/4, 3/4], H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446188083
    assert_close(entropy_from_logits(t([[[0.0, math.log(3)]]])), t([[0.5623351446188083]]))


def test_entropy_matches_definition_and_bf16_upcasts():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 11, generator=g, dtype=F64) * 5
    p = torch.softmax(logits, -1)
    assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    out = entropy_from_logits(logits.to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, 4)


def test_logprobs_by_hand_with_temperature():
    logits = t([[[0.0, math.log(3)]]])
    # T=1: p = [1/4, 3/4]; log p[1] = ln 0.75 = -0.2876820724517809
    assert_close(logprobs_from_logits(logits, torch.tensor([[1]])), t([[-0.2876820724517809]]))
    # T=2: logits/2 = [0, ln sqrt 3]; p[0] = 1/(1+sqrt 3); log p[0] = -ln(1+sqrt 3) = -1.005052538742381
    assert_close(logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0), t([[-1.005052538742381]]))


def test_logprobs_match_log_softmax_and_temperature_zero():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 9, generator=g, dtype=F64)
    labels = torch.randint(0, 9, (2, 3), generator=g)
    for temp in (1.0, 0.7):
        ref = torch.log_softmax(logits / temp, -1).gather(-1, labels[..., None]).squeeze(-1)
        assert_close(logprobs_from_logits(logits, labels, temperature=temp), ref)
    assert_close(logprobs_from_logits(logits, labels, temperature=0.0), logprobs_from_logits(logits, labels))


def test_logprobs_bf16_path_and_grad():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 9, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 9, (2, 3), generator=g)
    out = logprobs_from_logits(logits, labels, temperature=0.7)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.detach().float() / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert_close(out, ref, atol=2e-2, rtol=2e-2)  # logits / 0.7 is rounded to bf16 first
    out.sum().backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


def test_logprobs_errors():
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1.0"):
        logprobs_from_logits(logits, torch.zeros(1, 2, dtype=torch.long), temperature=-1.0)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        logprobs_from_logits(logits, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="must equal logits shape without the vocab dim"):
        logprobs_from_logits(logits, torch.zeros(1, 3, dtype=torch.long))
