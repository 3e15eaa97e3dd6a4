"""Pure pieces of the loop: prompt tokenization/filtering, batch layout, data order, metrics."""

from __future__ import annotations

import pytest
import torch

from rlctl.generator import GenerationOutput
from types import SimpleNamespace

from rlctl.loop import PhaseTimer, PromptData, add_tis_weights, build_batch, compute_advantages, evaluate, overlong_penalties, epoch_order, pad_logprobs, rollout_metrics, tokenize_prompts
from rlctl.testing import build_tiny_tokenizer


def test_long_prompts_are_dropped_and_counted_not_truncated():
    tok = build_tiny_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"},
            {"prompt": [{"role": "user", "content": "x" * 500}], "answer": "2"},
            {"prompt": [{"role": "user", "content": "ok?"}], "answer": "3"}]
    data = tokenize_prompts(rows, tok, max_prompt_length=64)
    assert data.dropped_too_long == 1
    assert [r["answer"] for r in data.rows] == ["1", "3"]
    # chat template applied, ids exactly the template's (no truncation): <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n
    assert data.prompt_ids[0][0] == 1 and len(data.prompt_ids[0]) == 1 + 5 + 2 + 1 + 1 + 1 + 10
    assert tok.decode(data.prompt_ids[0]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_build_batch_is_prompt_plus_response_ids_exactly():
    b = build_batch([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 2, 0], [0, 0, 8, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    assert pad_logprobs([[-0.5, -1.0], [-0.25, -2.0, -0.75]], 3).tolist() == [[-0.5, -1.0, 0.0], [-0.25, -2.0, -0.75]]


def test_epoch_order_is_seeded():
    assert epoch_order(10, seed=1, epoch=0) == epoch_order(10, seed=1, epoch=0)
    assert epoch_order(10, seed=1, epoch=0) != epoch_order(10, seed=1, epoch=1)
    assert sorted(epoch_order(10, seed=1, epoch=0)) == list(range(10))


def test_rollout_metrics_hand_numbers():
    out = GenerationOutput(output_ids=[[1, 2], [3], [4, 5, 6, 7], [8]], logprobs=[[-1.0, -1.0], [-2.0], [0.0] * 4, [-1.0]],
                           finish_reasons=["stop", "stop", "length", "stop"])
    scored = [{"reward": r, "formatted": f, "correct_strict": cs, "correct_flexible": cf}
              for r, f, cs, cf in [(1.0, 1.0, 1.0, 1.0), (0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 1.0), (0.5, 0.0, 0.0, 1.0)]]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv = torch.tensor([0.7071, -0.7071, 0.0, 0.0])
    batch = build_batch([[9]] * 4, out.output_ids, 0)
    rollout_lp = pad_logprobs(out.logprobs, 4)
    batch["old_logprobs"] = rollout_lp + 0.25 * batch["response_mask"]  # trainer differs by 0.25 on every token
    timer = PhaseTimer({"generate": 2.0})
    m = rollout_metrics(out, scored, rewards, adv, 2, batch, rollout_lp, timer)
    assert m["reward/mean"] == 0.5 and m["reward/format_rate"] == 0.25 and m["reward/accuracy_flexible"] == 0.75
    assert m["response_length/mean"] == 2.0 and m["response_length/max"] == 4.0
    assert m["response/truncation_rate"] == 0.25
    assert m["groups/zero_variance_fraction"] == 0.5  # group 2 has rewards (0.5, 0.5)
    assert abs(m["policy/rollout_train_logprobs_abs_diff_mean"] - 0.25) < 1e-7
    assert m["rollout/tokens"] == 8.0 and m["rollout/tokens_per_s"] == 4.0


def test_advantage_estimators_hand_numbers():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])  # 2 groups of n=2: (1, 0) and (0, 0)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # 2, 1, 1, 0 loss tokens
    algo = SimpleNamespace(advantage_estimator="grpo", grpo_norm_by_std=True)
    # GRPO: (r - 0.5) / (unbiased std sqrt(0.5) + 1e-6); the flat group gets 0
    assert torch.allclose(compute_advantages(algo, rewards, 2, mask), torch.tensor([0.70711, -0.70711, 0.0, 0.0]), atol=1e-5)
    algo.grpo_norm_by_std = False  # Dr. GRPO: r - group mean
    assert compute_advantages(algo, rewards, 2, mask).tolist() == [0.5, -0.5, 0.0, 0.0]
    algo.advantage_estimator = "rloo"  # r_i - mean of the other sample
    assert compute_advantages(algo, rewards, 2, mask).tolist() == [1.0, -1.0, 0.0, 0.0]
    # REINFORCE++: token-weighted batch whitening, weights 2, 1, 1, 0: mean 2/4 = 0.5,
    # var (2 * 0.25 + 0.25 + 0.25) / (4 - 1) = 1/3, so A = (r - 0.5) * sqrt(3)
    algo.advantage_estimator = "reinforce++"
    got = compute_advantages(algo, rewards, 2, mask)
    assert torch.allclose(got, torch.tensor([0.5, -0.5, -0.5, -0.5]) * 3 ** 0.5, atol=1e-5)


def test_tis_weights_into_the_batch_hand_numbers():
    import math
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rollout = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    batch = {"response_mask": mask, "old_logprobs": rollout + torch.tensor([[math.log(3.0), math.log(0.5), 7.0], [0.0, 0.0, 0.0]])}
    opc = SimpleNamespace(tis_ratio_type=None, token_tis_ratio_clip_high=2.0, sequence_tis_ratio_clip_high=5.0)
    assert add_tis_weights(opc, batch, rollout) == {} and "tis_weights" not in batch
    opc.tis_ratio_type = "token"  # token ratios 3, 0.5 | 1: the 3 is capped at 2
    m = add_tis_weights(opc, batch, rollout)
    assert torch.allclose(batch["tis_weights"], torch.tensor([[2.0, 0.5, 0.0], [1.0, 0.0, 0.0]]))
    assert m["off_policy/tis_ratio_mean"] == pytest.approx(1.5) and m["off_policy/tis_ratio_max"] == pytest.approx(3.0)
    assert m["off_policy/tis_ratio_truncated_fraction"] == pytest.approx(1 / 3)
    opc.tis_ratio_type = "sequence"  # sequence ratios 3 * 0.5 = 1.5 and 1, under the cap of 5
    m = add_tis_weights(opc, batch, rollout)
    assert torch.allclose(batch["tis_weights"], torch.tensor([[1.5, 1.5, 0.0], [1.0, 0.0, 0.0]]))
    assert m == pytest.approx({"off_policy/tis_ratio_mean": 1.25, "off_policy/tis_ratio_max": 1.5,
                               "off_policy/tis_ratio_truncated_fraction": 0.0})


def test_overlong_penalty_hand_numbers():
    # limit 10 tokens, buffer 4: no penalty up to 6 tokens, then -(L - 6) / 4 * 0.5
    outs = [[1] * k for k in (3, 6, 7, 8, 10)]
    cfg = SimpleNamespace(len=4, penalty_factor=0.5)
    assert overlong_penalties(cfg, outs, 10).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5]
    cfg.len = None
    assert overlong_penalties(cfg, outs, 10).tolist() == [0.0] * 5


def test_sampled_eval_pass_at_k_hand_numbers():
    texts = {1: "#### 3", 2: "so 3", 3: "#### 4"}  # the answer is 3: strict + flexible, flexible only, neither

    class Tok:
        def batch_decode(self, ids, skip_special_tokens=True):
            return [texts[o[0]] for o in ids]

    script = iter([[1, 3, 2, 2], [3, 3]])  # problem 0: right, wrong; 1: flexible twice; 2: wrong twice
    calls = []

    def generate(prompt_ids, sampling):
        calls.append([p[0] for p in prompt_ids])
        codes = next(script)
        return GenerationOutput([[c, c] for c in codes], [[0.0, 0.0]] * len(codes), ["stop"] * len(codes))

    data = PromptData([[10], [11], [12]], [{"answer": "3"}] * 3)
    m = evaluate(generate, data, Tok(), sampling=None, batch_size=2, n_samples=2)
    assert calls == [[10, 10, 11, 11], [12, 12]]  # each prompt k=2 times, 2 prompts per call
    assert m == pytest.approx({
        "eval/accuracy_strict_mean": 1 / 6, "eval/accuracy_flexible_mean": 3 / 6,
        "eval/pass@2_strict": 1 / 3, "eval/pass@2_flexible": 2 / 3,  # problems with a correct sample
        "eval/format_rate": 4 / 6, "eval/response_length_mean": 2.0, "eval/num_problems": 3.0,
        "eval/samples_per_problem": 2.0})
    # k = 1 keeps the greedy pass@1 keys
    script = iter([[1, 2], [3]])
    m = evaluate(generate, data, Tok(), sampling=None, batch_size=2)
    assert m == pytest.approx({"eval/accuracy_strict": 1 / 3, "eval/accuracy_flexible": 2 / 3, "eval/format_rate": 2 / 3,
                               "eval/response_length_mean": 2.0, "eval/num_problems": 3.0})
