"""Data-parallel correctness of ``PolicyTrainer``'s optimizer step: 2 gloo ranks, each with a fixed half
of 6 sequences, must compute the same gradient (and report the same metrics) as 1 rank over all 6, for
every ``trainer.algorithm.loss_reduction``.

The halves have different numbers of valid response tokens (rank 0: 1 + 2 + 1 = 4, rank 1: 4 + 3 + 5 = 12),
so a per-rank ``token_mean`` denominator, averaged over ranks by FSDP, weighs rank 0's tokens 3x more than
rank 1's (the bug this file guards against).

The ranks run in spawned processes (one 2-rank group, one 1-rank group, all at once). The full gradient
is captured right before ``optimizer.step`` with ``DTensor.full_tensor()`` (Adam's first step is about
``lr * sign(grad)``, so comparing parameters after an Adam step would hide a scale error).

Run: ``pytest -q tests/unit/test_trainer_dp.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import pytest
import torch

from rlctl.testing import free_port

REDUCTIONS = ("token_mean", "sequence_mean", "seq_mean_token_sum_norm")
METRICS = ("policy/loss", "policy/pg_loss", "policy/kl", "policy/entropy", "policy/clip_fraction", "policy/grad_norm")


def _tcfg(loss_reduction: str):
    """The trainer section of these tests (schema defaults elsewhere)."""
    from rlctl.testing import trainer_section

    # max_grad_norm huge: the captured gradient is the raw one (clipping is checked through policy/grad_norm)
    return trainer_section({
        "algorithm.loss_reduction": loss_reduction, "algorithm.kl_loss_coef": 0.1, "algorithm.use_entropy_loss": True,
        "policy.optimizer_config.lr": 1e-2, "policy.optimizer_config.weight_decay": 0.0,
        "policy.optimizer_config.max_grad_norm": 1e9,
    }, seed=0, gradient_checkpointing=False, micro_forward_batch_size_per_gpu=2, micro_train_batch_size_per_gpu=2)


def _batch() -> dict[str, torch.Tensor]:
    """6 sequences; rows 0-2 (rank 0's half) have 4 valid response tokens in all, rows 3-5 have 12."""
    from rlctl.loop import build_batch

    prompts = [[1, 10, 11], [1, 20, 21, 22], [1, 30], [1, 40, 41], [1, 50, 51, 52], [1, 60]]
    outputs = [[70], [71, 72], [73], [74, 75, 76, 77], [78, 79, 80], [81, 82, 83, 84, 85]]
    b = build_batch(prompts, outputs, pad_id=0)
    b["advantages"] = torch.tensor([1.0, -0.5, 0.8, -1.0, 0.3, 0.6])
    g = torch.Generator().manual_seed(0)
    # the tiny random Llama is near uniform over its 259 tokens: old log-probs around log(1/259) with
    # +-0.4 noise give ratios of about exp(-+0.4), so some tokens are clipped (eps 0.2) and some not
    base = -torch.log(torch.tensor(259.0))
    b["old_logprobs"] = base + (torch.rand(b["response_mask"].shape, generator=g) - 0.5) * 0.8
    b["ref_logprobs"] = base + (torch.rand(b["response_mask"].shape, generator=g) - 0.5) * 0.8
    return b


def _rank(rank: int, world: int, port: int, model_path: str, q) -> None:  # a spawned process
    import torch.distributed as dist

    from rlctl.trainer import PolicyTrainer

    PolicyTrainer.init_process_group(rank, world, "127.0.0.1", port, "cpu")
    try:
        full = _batch()
        per = 6 // world
        shard = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
        out = {}
        for red in REDUCTIONS:
            tr = PolicyTrainer(model_path, _tcfg(red), rank=rank, world_size=world, device="cpu", max_response_len=8)
            grads: dict[str, torch.Tensor] = {}
            step = tr.optimizer.step

            def capture(*a, _step=step, _tr=tr, _grads=grads, **kw):
                _grads.update({n: p.grad.full_tensor().clone() for n, p in _tr.model.named_parameters()})
                return _step(*a, **kw)

            tr.optimizer.step = capture
            m = tr.train_step(shard, temperature=1.0, mini_batch_size=per)
            out[red] = ({k: m[k] for k in METRICS}, grads)
        # numpy, not tensors: torch shares tensors through file descriptors that die with this process
        q.put((world, rank, {r: (m, {n: g.numpy() for n, g in gs.items()}) for r, (m, gs) in out.items()}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(world, rank): {loss_reduction: (metrics, full grads)}} for the 2-rank and the 1-rank group."""
    import multiprocessing as mp

    from rlctl.testing import build_tiny_llama

    path = str(build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", seed=1))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p2, p1 = free_port(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, p2, path, q)) for r in (0, 1)]
    procs.append(ctx.Process(target=_rank, args=(0, 1, p1, path, q)))
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            world, rank, out = q.get(timeout=300)
            results[(world, rank)] = out
    finally:
        for p in procs:
            p.join(30)
    return results


def test_the_halves_have_different_token_counts():
    mask = _batch()["response_mask"]
    assert mask[:3].sum().item() == 4.0 and mask[3:].sum().item() == 12.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_two_ranks_compute_the_one_rank_gradient(runs, reduction):
    one_m, one_g = runs[(1, 0)][reduction]
    for rank in (0, 1):
        two_m, two_g = runs[(2, rank)][reduction]
        assert one_g.keys() == two_g.keys() and len(one_g) > 0
        for name in one_g:
            torch.testing.assert_close(torch.from_numpy(two_g[name]), torch.from_numpy(one_g[name]), atol=1e-6, rtol=1e-4, msg=lambda s: f"{name}: {s}")
        for k in METRICS:  # global means on every rank (the Ray group averages the ranks' equal values)
            assert two_m[k] == pytest.approx(one_m[k], rel=1e-5, abs=1e-7), k
    assert one_m["policy/grad_norm"] > 0 and 0 < one_m["policy/clip_fraction"] < 1
