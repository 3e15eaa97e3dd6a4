"""Padding-free micro-batches (rlctl.packing): token-budget plans, the packed layout, packed == padded
log-probs (sdpa and eager), and one optimizer step's gradients independent of the micro-batch split
(1 gloo rank here, 2 gloo ranks with an uneven number of micro-batches in spawned processes)."""

from __future__ import annotations

import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rlctl.loop import build_batch
from rlctl.packing import (
    check_packing_support,
    computed_tokens,
    empty_micro_batch,
    pack_rows,
    packed_logprobs_forward,
    plan_micro_batches,
)
from rlctl.testing import build_tiny_llama, free_port, spawn_ranks, trainer_section
from rlctl.trainer import RESPONSE_KEYS, PolicyTrainer, response_logprobs_forward


# ------------------------------------------------------------------ plans


def test_token_budget_plan_is_greedy_over_sorted_lengths():
    lengths = torch.tensor([5, 3, 9, 4, 20, 2])
    # sorted: idx 5 (2), 1 (3), 3 (4), 0 (5), 2 (9), 4 (20); 2+3+4 = 9 <= 10, +5 = 14 > 10: close; 5+9 > 10;
    # 9+20 > 10; the 20-token sequence is longer than the budget and runs alone
    plan = plan_micro_batches(lengths, 4, 10)
    assert [p.tolist() for p in plan] == [[5, 1, 3], [0], [2], [4]]
    assert [p.tolist() for p in plan_micro_batches(lengths, 4, None)] == [[5, 1, 3, 0], [2, 4]]
    assert [p.tolist() for p in plan_micro_batches(lengths, 1, 10**9)] == [[5, 1, 3, 0, 2, 4]]
    assert [p.tolist() for p in plan_micro_batches(lengths, 1, 14)] == [[5, 1, 3, 0], [2], [4]]  # 2+3+4+5 = 14 fits
    assert plan_micro_batches(torch.zeros(0, dtype=torch.long), 2, 8) == []
    with pytest.raises(ValueError, match="max_tokens must be >= 1 token, got 0"):
        plan_micro_batches(lengths, 1, 0)
    with pytest.raises(ValueError, match="size must be >= 1 sequence, got 0"):
        plan_micro_batches(lengths, 0, None)


def test_token_budget_plan_counts_the_padded_size_for_the_padded_forward():
    # (prompt, response): idx 0 (1, 9) = 10, 1 (6, 1) = 7, 2 (4, 4) = 8, 3 (2, 2) = 4; sorted by length: 3, 1, 2, 0
    prompt, resp = torch.tensor([1, 6, 4, 2]), torch.tensor([9, 1, 4, 2])
    lengths = prompt + resp
    # real tokens: 4 + 7 + 8 = 19 <= 20, + 10 > 20: [[3, 1, 2], [0]]
    assert [p.tolist() for p in plan_micro_batches(lengths, 1, 20)] == [[3, 1, 2], [0]]
    # padded: [3] 1 x (2 + 2) = 4; [3, 1] 2 x (6 + 2) = 16; [3, 1, 2] 3 x (6 + 4) = 30 > 20: close;
    # [2] 8; [2, 0] 2 x (4 + 9) = 26 > 20: close; [0] alone
    assert [p.tolist() for p in plan_micro_batches(lengths, 1, 20, (prompt, resp))] == [[3, 1], [2], [0]]
    # an empty response still takes one column after trimming: (5, 0) and (5, 0) pad to 2 x 6 = 12 > 11
    two = (torch.tensor([5, 5]), torch.tensor([0, 0]))
    assert [p.tolist() for p in plan_micro_batches(torch.tensor([5, 5]), 1, 11, two)] == [[0], [1]]
    assert [p.tolist() for p in plan_micro_batches(torch.tensor([5, 5]), 1, 12, two)] == [[0, 1]]


def _batch():
    prompts = [[1, 10, 11, 12], [1, 20, 21], [1, 10, 11, 12], [1, 20, 21]]
    outputs = [[30, 31, 2], [40], [32, 33, 34, 2], [41, 42]]
    b = build_batch(prompts, outputs, pad_id=0)
    b["advantages"] = torch.tensor([1.0, -1.0, -1.0, 1.0])
    return b


def test_pack_rows_layout():
    b = _batch()  # P = 4, T = 4; row 1 = one left pad, prompt [1, 20, 21], response [40]
    p = pack_rows(b["input_ids"][:2], b["attention_mask"][:2], 4)
    assert p.input_ids.tolist() == [[1, 10, 11, 12, 30, 31, 2, 1, 20, 21, 40]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]]
    # row 0's response tokens sit at 4, 5, 6 (predicted from 3, 4, 5); row 1's at 10 (from 9)
    assert p.hidden_index.tolist() == [3, 4, 5, 9]
    assert p.labels.tolist() == [30, 31, 2, 40]
    assert p.rows.tolist() == [0, 0, 0, 1] and p.cols.tolist() == [0, 1, 2, 0]
    e = build_batch([[], [1, 20]], [[30], [40]], pad_id=0)
    with pytest.raises(ValueError, match="pack_rows: a row has an empty prompt"):
        pack_rows(e["input_ids"], e["attention_mask"], 1)


def test_empty_micro_batch_and_computed_tokens():
    b = _batch()
    b["old_logprobs"] = torch.ones(4, 4)
    e = empty_micro_batch(b, RESPONSE_KEYS)
    assert e["input_ids"].tolist() == [[0, 0]] and e["attention_mask"].tolist() == [[1, 1]]
    assert e["response_mask"].tolist() == [[0.0]] and e["old_logprobs"].tolist() == [[0.0]]
    assert e["advantages"].tolist() == [0.0] and set(e) == set(b)
    assert computed_tokens(b, packed=False) == 32 and computed_tokens(b, packed=True) == 7 + 4 + 8 + 5
    assert computed_tokens(e, packed=True) == 2


# ------------------------------------------------------------------ packed forward


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", seed=1))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logprobs_and_gradients_equal_the_padded_path(tiny, impl):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation=impl)
    prompts = [[1, 10, 11, 12], [1, 20, 21], [1, 10, 11, 12, 13, 14], [1, 20], [1, 7, 8]]
    outputs = [[30, 31, 2], [40], [32, 33, 34, 2], [41, 42], []]  # the last response is empty
    b = build_batch(prompts, outputs, pad_id=0)
    T, mask = b["response_mask"].shape[1], b["response_mask"]
    grads = []
    results = []
    for fwd in (response_logprobs_forward, packed_logprobs_forward):
        model.zero_grad()
        logp, ent = fwd(model, b["input_ids"], b["attention_mask"], T, 0.7, with_entropy=True, entropy_grad=True)
        ((logp * mask).sum() + 0.1 * (ent * mask).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        results.append((logp.detach(), ent.detach()))
    (lp_pad, ent_pad), (lp_pk, ent_pk) = results
    torch.testing.assert_close(lp_pk * mask, lp_pad * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_pk * mask, ent_pad * mask, atol=1e-5, rtol=0)
    assert (lp_pk[mask == 0] == 0).all()  # response padding is 0 in the packed path
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)
    # control: the same packed row with one running position id (no sequence boundaries) is NOT the same
    # thing, so the equality above comes from the block-diagonal mask
    p = pack_rows(b["input_ids"], b["attention_mask"], T)
    with torch.no_grad():
        logits = model(input_ids=p.input_ids, position_ids=torch.arange(p.input_ids.shape[1])[None]).logits[0].float()
    leaked = torch.log_softmax(logits / 0.7, -1)[p.hidden_index].gather(-1, p.labels[:, None])[:, 0]
    assert (leaked[3:] - lp_pk[p.rows[3:], p.cols[3:]]).abs().max() > 1e-3


def test_packing_refuses_an_attention_implementation_without_packed_masks():
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="remove_microbatch_padding=true needs attention implementation sdpa / eager / "
                                         "flex_attention; the model uses 'flash_attention_2'"):
        check_packing_support(model)


# ------------------------------------------------------------------ trainer: the split does not change the gradient


@pytest.fixture(scope="module")
def pg():
    PolicyTrainer.init_process_group(0, 1, "127.0.0.1", free_port(), "cpu")
    yield
    dist.destroy_process_group()


def _tcfg():
    """The trainer section of these tests (schema defaults elsewhere); max_grad_norm 1e9: no clipping."""
    return trainer_section({
        "algorithm.kl_loss_coef": 0.1, "algorithm.use_entropy_loss": True,
        "policy.optimizer_config.lr": 1e-2, "policy.optimizer_config.weight_decay": 0.0,
        "policy.optimizer_config.max_grad_norm": 1e9,
    }, seed=0, gradient_checkpointing=False, micro_forward_batch_size_per_gpu=2, micro_train_batch_size_per_gpu=2)


def _random_batch(seed: int, n: int, min_len: int, max_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompts, outputs = [], []
    for _ in range(n):
        p = int(torch.randint(1, max_len // 2 + 1, (1,), generator=g))
        o = int(torch.randint(max(0, min_len - p), max_len - p + 1, (1,), generator=g))
        prompts.append([1] + torch.randint(3, 250, (p - 1,), generator=g).tolist())
        outputs.append(torch.randint(3, 250, (max(o, 1),), generator=g).tolist())
    b = build_batch(prompts, outputs, pad_id=0)
    b["advantages"] = torch.randn(n, generator=g)
    return b


def _one_step_grads(tr: PolicyTrainer, batch, **cfg) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Gradients of one optimizer step (the step itself is replaced, so the weights never change)."""
    tr.tcfg = trainer_section(base=tr.tcfg, **cfg)  # the section is frozen: a changed copy
    grads: dict[str, torch.Tensor] = {}

    def capture():
        grads.update({n: p.grad.full_tensor().clone() for n, p in tr.model.named_parameters()})

    tr.optimizer.step = capture
    m = tr.train_step(batch, 1.0, mini_batch_size=batch["input_ids"].shape[0])
    return grads, m


SPLITS = [  # (remove_microbatch_padding, micro_train_batch_size_per_gpu, max_tokens_per_microbatch)
    (False, 1, None), (False, 3, None), (True, 1, None), (True, 3, None), (True, 6, None),
    (False, 1, 16), (True, 1, 16), (True, 1, 64), (False, 1, 64), (True, 1, 10**9),
]


LOSS_METRICS = ("policy/loss", "policy/pg_loss", "policy/kl", "policy/entropy", "policy/clip_fraction")


def _compare_splits(tr: PolicyTrainer, b) -> dict[tuple, float]:
    """For every split in SPLITS against one padded micro-batch of all sequences: the max |grad difference|
    over all parameters relative to the largest gradient entry, and the max relative difference of the
    loss metrics."""
    base, base_m = _one_step_grads(tr, b, remove_microbatch_padding=False, micro_train_batch_size_per_gpu=6,
                                   max_tokens_per_microbatch=None)
    scale = max(float(g.abs().max()) for g in base.values())
    assert scale > 1e-3  # a real gradient
    diffs = {}
    for packed, micro, budget in SPLITS:
        g, m = _one_step_grads(tr, b, remove_microbatch_padding=packed, micro_train_batch_size_per_gpu=micro,
                               max_tokens_per_microbatch=budget)
        diffs[(packed, micro, budget)] = max(float((g[n] - base[n]).abs().max()) for n in base) / scale
        # the loss terms too: an empty micro-batch must add exactly nothing (its gradient alone can be ~0 at init)
        diffs[(packed, micro, budget, "loss")] = max(abs(m[k] - base_m[k]) / max(abs(base_m[k]), 1e-3) for k in LOSS_METRICS)
    return diffs


def test_gradient_does_not_depend_on_the_split_one_rank(pg, tiny):
    tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=12)
    b = _random_batch(0, 6, 5, 14)
    lengths = b["attention_mask"].sum(1)
    # lengths 11 to 14: one sequence per micro-batch at 16 tokens, several sequences at 64, all at 1e9
    assert len(plan_micro_batches(lengths, 1, 16)) == 6 and 1 < len(plan_micro_batches(lengths, 1, 64)) < 6
    b["old_logprobs"] = tr.compute_logprobs(b, 1.0) + 0.05 * torch.randn(b["response_mask"].shape)  # ratios != 1
    b["ref_logprobs"] = tr.compute_logprobs(b, 1.0, "ref") - 0.1
    diffs = _compare_splits(tr, b)
    assert max(diffs.values()) < 1e-4, diffs


def test_computed_tokens_count_the_padding_the_forward_ran(pg, tiny):
    tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
    b = _batch()  # real lengths 7, 4, 8, 5; P = T = 4
    b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
    b["ref_logprobs"] = b["old_logprobs"]
    _, m = _one_step_grads(tr, b, micro_train_batch_size_per_gpu=4)
    assert m["train/computed_tokens"] == 4 * 8  # one micro-batch, nothing to trim
    _, m = _one_step_grads(tr, b, micro_train_batch_size_per_gpu=2)
    # length order 1, 3 | 0, 2: rows 1 and 3 trimmed to 5 columns (one left pad, 2 response columns), rows 0, 2 keep 8
    assert m["train/computed_tokens"] == 2 * 5 + 2 * 8
    _, m = _one_step_grads(tr, b, remove_microbatch_padding=True)
    assert m["train/computed_tokens"] == 7 + 4 + 8 + 5
    # a 16-token budget on the padded forward: rows (prompt, response) 1 (3, 1), 3 (3, 2), 0 (4, 3), 2 (4, 4);
    # [1, 3] 2 x 5 = 10, + row 0: 3 x 7 = 21 > 16; [0, 2] 2 x 8 = 16 (on real tokens it was [1, 3, 0] = 21 padded)
    _, m = _one_step_grads(tr, b, remove_microbatch_padding=False, max_tokens_per_microbatch=16)
    assert m["train/computed_tokens"] == 10 + 16
    tr.tcfg = trainer_section(base=tr.tcfg, max_tokens_per_microbatch=None)
    tr.tcfg = trainer_section(base=tr.tcfg, update_epochs_per_batch=2)  # per update epoch, as the loop's train/tokens
    _, m = _one_step_grads(tr, b, remove_microbatch_padding=True)
    assert m["train/computed_tokens"] == 24


def test_rank_metrics_sum_computed_tokens_and_average_the_rest():
    from rlctl.job.groups import merge_rank_metrics

    got = merge_rank_metrics([{"policy/loss": 1.0, "train/computed_tokens": 100.0},
                              {"policy/loss": 3.0, "train/computed_tokens": 60.0}])
    assert got == {"policy/loss": 2.0, "train/computed_tokens": 160.0}


def _two_rank_worker(rank: int, port: int, path: str, q) -> None:  # a spawned process
    try:
        PolicyTrainer.init_process_group(rank, 2, "127.0.0.1", port, "cpu", timeout_s=60)  # a hang fails
        tr = PolicyTrainer(path, _tcfg(), rank=rank, world_size=2, device="cpu", max_response_len=12)
        # rank 0: six 2-token sequences (1 micro-batch of 16 tokens), rank 1: 8 to 14 tokens each (several)
        b = _random_batch(10 + rank, 6, 2 if rank == 0 else 8, 2 if rank == 0 else 14)
        counts = len(plan_micro_batches(b["attention_mask"].sum(1), 1, 16))
        tr.tcfg = trainer_section(base=tr.tcfg, max_tokens_per_microbatch=16)  # uneven no-grad forwards too
        lp_budget = tr.compute_logprobs(b, 1.0)
        tr.tcfg = trainer_section(base=tr.tcfg, max_tokens_per_microbatch=None)
        lp_fixed = tr.compute_logprobs(b, 1.0)
        lp_diff = float((lp_budget - lp_fixed).mul(b["response_mask"]).abs().max())
        b["old_logprobs"] = lp_fixed + 0.05 * torch.randn(b["response_mask"].shape)
        b["ref_logprobs"] = tr.compute_logprobs(b, 1.0, "ref") - 0.1
        diffs = _compare_splits(tr, b)
        dist.destroy_process_group()
        q.put((rank, (counts, lp_diff, max(diffs.values()))))
    except BaseException:  # noqa: BLE001 - reported to the test
        q.put((rank, traceback.format_exc()))


def test_gradient_does_not_depend_on_the_split_two_ranks_uneven_micro_batches(tiny):
    """Rank 0 plans 1 micro-batch and rank 1 several: rank 0 runs empty micro-batches (no hang) and the
    all-reduced gradients equal one padded micro-batch per rank."""
    port = free_port()
    got = spawn_ranks(_two_rank_worker, [(r, port, tiny) for r in range(2)], timeout_s=400)
    assert all(isinstance(v, tuple) for v in got.values()), "\n".join(str(v) for v in got.values())
    (c0, lp0, d0), (c1, lp1, d1) = got[0], got[1]
    assert c0 == 1 and c1 >= 3, (c0, c1)
    assert lp0 < 1e-5 and lp1 < 1e-5
    assert d0 < 1e-4 and d1 < 1e-4
