"""PolicyTrainer on a 1-rank gloo group with a tiny random Llama (CPU, fp32)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rlctl.loop import build_batch
from rlctl.testing import build_tiny_llama, free_port, trainer_section
from rlctl.packing import plan_micro_batches
from rlctl.trainer import PolicyTrainer, response_logits_forward, trim_padding


def _tcfg(*, micro: int = 2, use_kl_loss: bool = False, lr: float = 1e-2, scheduler: str = "constant_with_warmup",
          warmup: int = 0, max_steps: int | None = None):
    """The trainer section these tests run with (schema defaults elsewhere)."""
    return trainer_section({
        "algorithm.use_kl_loss": use_kl_loss, "algorithm.kl_loss_coef": 0.1, "algorithm.entropy_loss_coef": 0.0,
        "policy.optimizer_config.lr": lr, "policy.optimizer_config.weight_decay": 0.0,
        "policy.optimizer_config.scheduler": scheduler, "policy.optimizer_config.num_warmup_steps": warmup,
    }, seed=0, gradient_checkpointing=False, micro_forward_batch_size_per_gpu=2, micro_train_batch_size_per_gpu=micro,
        max_steps=max_steps, train_batch_size=2, policy_mini_batch_size=1)


def test_trainer_section_applies_overrides_on_the_schema_defaults():
    t = trainer_section({"algorithm.use_kl_loss": False, "policy.optimizer_config.lr": 1e-2},
                        micro_train_batch_size_per_gpu=2)
    assert (t.algorithm.use_kl_loss, t.policy.optimizer_config.lr, t.micro_train_batch_size_per_gpu) == (False, 1e-2, 2)
    assert (t.algorithm.kl_loss_coef, t.policy.optimizer_config.max_grad_norm, t.seed) == (0.001, 1.0, 42)  # defaults
    t2 = trainer_section(base=t, update_epochs_per_batch=3)  # a changed copy; the frozen original stays
    assert (t2.update_epochs_per_batch, t2.policy.optimizer_config.lr, t.update_epochs_per_batch) == (3, 1e-2, 1)
    with pytest.raises(Exception, match="frozen"):
        t.seed = 1


def test_trainer_section_refuses_unknown_keys_and_bad_values():
    with pytest.raises(KeyError, match=r"trainer\.algorithm\.use_kl_los: not a key.*did you mean 'use_kl_loss'"):
        trainer_section({"algorithm.use_kl_los": True})
    with pytest.raises(KeyError, match=r"trainer\.micro_batch: not a key"):
        trainer_section(micro_batch=2)
    with pytest.raises(KeyError, match=r"trainer\.algorithm: a section, not a leaf"):
        trainer_section({"algorithm": {"use_kl_loss": True}})
    with pytest.raises(ValueError, match="policy.optimizer_config.lr"):  # pydantic: lr must be > 0
        trainer_section({"policy.optimizer_config.lr": 0.0})


@pytest.fixture(scope="module")
def pg():
    PolicyTrainer.init_process_group(0, 1, "127.0.0.1", free_port(), "cpu")
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", seed=1))


def _batch():
    prompts = [[1, 10, 11, 12], [1, 20, 21], [1, 10, 11, 12], [1, 20, 21]]
    outputs = [[30, 31, 2], [40], [32, 33, 34, 2], [41, 42]]
    b = build_batch(prompts, outputs, pad_id=0)
    b["advantages"] = torch.tensor([1.0, -1.0, -1.0, 1.0])
    return b


def test_logprobs_match_manual_forward(pg, tiny):
    from transformers import AutoModelForCausalLM

    tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
    b = _batch()
    lp = tr.compute_logprobs(b, temperature=0.7)
    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    # row 1: prompt [1,20,21], response [40] -> one unpadded forward
    ids = torch.tensor([[1, 20, 21, 40]])
    logits = ref(input_ids=ids).logits[0, 2] / 0.7
    expected = torch.log_softmax(logits, -1)[40]
    torch.testing.assert_close(lp[1, 0], expected, atol=1e-5, rtol=0)
    assert lp.shape == (4, 4)


def test_train_step_raises_logprob_of_positive_advantage(pg, tiny):
    tr = PolicyTrainer(tiny, _tcfg(lr=3e-3), rank=0, world_size=1, device="cpu", max_response_len=8)
    b = _batch()
    before = tr.compute_logprobs(b, 1.0)
    b["old_logprobs"] = before
    m = tr.train_step(b, 1.0, mini_batch_size=4)
    assert "policy/kl" not in m  # KL off: no KL metric (rlctl plot then draws no KL panel)
    after = tr.compute_logprobs(b, 1.0)
    mask = b["response_mask"]
    seq_delta = ((after - before) * mask).sum(1)
    assert m["policy/grad_norm"] > 0
    assert seq_delta[0] > 0 and seq_delta[3] > 0  # advantage +1
    assert seq_delta[1] < 0 and seq_delta[2] < 0  # advantage -1
    assert m["policy/skipped_steps"] == 0.0


def test_micro_batch_size_does_not_change_the_update(pg, tiny):
    results = []
    for micro in (1, 4):
        tr = PolicyTrainer(tiny, _tcfg(micro=micro), rank=0, world_size=1, device="cpu", max_response_len=8)
        b = _batch()
        b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
        tr.train_step(b, 1.0, mini_batch_size=4)
        results.append({k: v.detach().clone() for k, v in tr.full_state_dict().items()})
    for k in results[0]:
        # Adam step of lr=1e-2: a real difference would be ~1e-2; micro-batch 1 runs without any padding
        # (trimmed), so float rounding differs by up to ~2e-5 on near-zero gradients that Adam normalizes
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-4, rtol=1e-5)


def test_right_packed_rows_run_causal_without_a_mask():
    """The forward sees [prompt, response, pads] rows and no mask tensor: every pad is after all of its row's real
    tokens (causal attention alone is exact for them) and column 0 is real in every row."""
    seen = {}

    class Spy(torch.nn.Module):
        """Hidden state = the packed column index; the LM head copies it into all 7 'vocabulary' logits."""

        def __init__(self):
            super().__init__()
            self.head = torch.nn.Identity()

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, attention_mask, use_cache, logits_to_keep, **kw):
            seen.update(ids=input_ids, mask=attention_mask, kw=kw, keep=logits_to_keep)
            hidden = torch.arange(input_ids.shape[1], dtype=torch.float32)[None, :, None].expand(input_ids.shape[0], -1, 7)
            return SimpleNamespace(logits=self.head(hidden[:, -logits_to_keep:]))

    b = _batch()  # P = 4, T = 4; rows 1 and 3 have one left pad
    out = response_logits_forward(Spy(), b["input_ids"], b["attention_mask"], 4)
    assert out.shape == (4, 4, 7) and seen["keep"] == 6  # T + max left pads + 1
    # the head only saw each row's response positions: column P-1+j, shifted left by the row's left pads
    assert out[..., 0].tolist() == [[3, 4, 5, 6], [2, 3, 4, 5], [3, 4, 5, 6], [2, 3, 4, 5]]
    assert seen["ids"].tolist() == [[1, 10, 11, 12, 30, 31, 2, 0], [1, 20, 21, 40, 0, 0, 0, 0],
                                    [1, 10, 11, 12, 32, 33, 34, 2], [1, 20, 21, 41, 42, 0, 0, 0]]
    assert seen["mask"] is None and seen["kw"] == {}  # causal only, default position ids 0..L-1
    real = b["attention_mask"].sum(1).tolist()
    assert real == [7, 4, 8, 5]  # each row's real tokens fill columns 0..real-1 of the packed row
    assert [row[:n] for row, n in zip(seen["ids"].tolist(), real)] == [
        [1, 10, 11, 12, 30, 31, 2], [1, 20, 21, 40], [1, 10, 11, 12, 32, 33, 34, 2], [1, 20, 21, 41, 42]]


def test_unmasked_causal_forward_equals_the_masked_one_values_and_gradients(tiny):
    """The trainer's forward without a mask tensor (causal over right-packed rows) gives the log-probs and the
    gradient of the forward with the explicit mask and position ids it replaced (fp32, SDPA on the CPU)."""
    from transformers import AutoModelForCausalLM

    from rlctl.testing import masked_response_logprobs
    from rlctl.trainer import response_logprobs_forward

    model = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="sdpa")
    b = _batch()  # rows 1 and 3 have a left pad; responses of 3, 1, 4, 2 tokens
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    found = []
    for fn in (lambda: response_logprobs_forward(model, b["input_ids"], b["attention_mask"], 4, 1.0)[0],
               lambda: masked_response_logprobs(model, b["input_ids"], b["attention_mask"], 4)):
        model.zero_grad(set_to_none=True)
        logp = fn()
        (-(adv[:, None] * logp * b["response_mask"]).sum()).backward()
        found.append((logp.detach() * b["response_mask"], [p.grad.clone() for p in model.parameters()]))
    (lp_new, g_new), (lp_old, g_old) = found
    assert b["response_mask"].sum() == 10
    torch.testing.assert_close(lp_new, lp_old, atol=1e-5, rtol=1e-5)
    for a, c in zip(g_new, g_old):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_batch_layout_check_refuses_a_pad_between_real_tokens():
    from rlctl.trainer import check_batch_layout

    b = _batch()  # P = T = 4: rows [0 1 1 1 | 1 0 0 0] etc. pass
    check_batch_layout(b["attention_mask"], 4)
    bad = b["attention_mask"].clone()
    bad[2, 5] = 0  # row 2's response: real, pad, real, real
    with pytest.raises(ValueError, match=r"trainer batch row 2: attention_mask \[1, 1, 1, 1, 1, 0, 1, 1\] has a pad "
                                         "between real tokens"):
        check_batch_layout(bad, 4)
    bad = b["attention_mask"].clone()
    bad[0, 1] = 0  # a pad inside row 0's prompt
    with pytest.raises(ValueError, match="trainer batch row 0"):
        check_batch_layout(bad, 4)


def test_forward_refuses_a_model_whose_head_it_cannot_hook():
    b = _batch()

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="NoHead has no output embedding"):
        response_logits_forward(NoHead(), b["input_ids"], b["attention_mask"], 4)

    class HeadNotUsed(torch.nn.Module):  # computes logits without calling its head: the hook never runs
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Identity()

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, logits_to_keep, **_):
            return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], logits_to_keep, 7))

    with pytest.raises(RuntimeError, match=r"logits of shape \(4, 6, 7\), expected \(4, 4, V\)"):
        response_logits_forward(HeadNotUsed(), b["input_ids"], b["attention_mask"], 4)


@pytest.mark.parametrize("lefts", [[0, 2, 5, 1], [2, 2, 2]], ids=["gather", "slice"])
def test_packed_forward_equals_unpadded_rows_with_checkpointing_untied(pg, tmp_path, lefts):
    """Logits and parameter gradients of the right-packed forward (FSDP2, gradient checkpointing, untied
    LM head) equal those of each row's own unpadded forward; the head hook is gone afterwards."""

    from rlctl.trainer import load_and_shard

    path = build_tiny_llama(tmp_path / "untied", seed=3, tie_word_embeddings=False)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    model = load_and_shard(str(path), mesh=mesh, device=torch.device("cpu"), param_dtype=None,
                           gradient_checkpointing=True, trainable=True)
    model.train()
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    P, T = 7, 4
    prompts = [torch.randint(3, 200, (P - lp,), generator=g).tolist() for lp in lefts]
    outs = [torch.randint(3, 200, (T - i % 2,), generator=g).tolist() for i in range(len(lefts))]
    b = build_batch(prompts, outs, pad_id=0)  # pads prompts to the longest one
    extra = P + T - b["input_ids"].shape[1]  # [2, 2, 2]: every row keeps 2 left pads (the slice path)
    for k in ("input_ids", "attention_mask"):
        b[k] = torch.nn.functional.pad(b[k], (extra, 0))
    assert (b["attention_mask"][:, :P] == 0).sum(1).tolist() == lefts
    logits = response_logits_forward(model, b["input_ids"], b["attention_mask"], T)
    (logits * b["response_mask"][..., None]).sum().backward()
    for i, (pr, o) in enumerate(zip(prompts, outs)):
        own = ref(input_ids=torch.tensor([pr + o])).logits[0, len(pr) - 1:-1]
        torch.testing.assert_close(logits[i, :len(o)], own, atol=1e-5, rtol=1e-5)
        own[:len(o)].sum().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_head_hook_is_removed_when_the_forward_raises():
    b = _batch()

    class Boom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Identity()

        def get_output_embeddings(self):
            return self.head

        def forward(self, **_):
            raise RuntimeError("boom")

    m = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        response_logits_forward(m, b["input_ids"], b["attention_mask"], 4)
    assert not m.head._forward_pre_hooks


def test_empty_prompt_is_refused_by_the_forward():
    b = build_batch([[], [1, 20]], [[30], [40]], pad_id=0)
    with pytest.raises(ValueError, match="empty prompt"):
        response_logits_forward(None, b["input_ids"], b["attention_mask"], 1)


def test_trim_padding_keeps_only_the_micro_batch_span():
    # rows 1 and 3 of _batch(): prompts [1,20,21] (P=4 with one left pad), responses [40] / [41,42] (T=4)
    b = _batch()
    b["old_logprobs"] = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    mb = {k: v[[1, 3]] for k, v in b.items()}
    out, T = trim_padding(mb)
    assert T == 4
    assert out["input_ids"].tolist() == [[1, 20, 21, 40, 0], [1, 20, 21, 41, 42]]  # pad column 0 and 2 response pads gone
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert out["response_mask"].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert out["old_logprobs"].tolist() == [[4.0, 5.0], [12.0, 13.0]]
    mb["tis_weights"] = mb["old_logprobs"] + 100
    assert trim_padding(mb)[0]["tis_weights"].tolist() == [[104.0, 105.0], [112.0, 113.0]]  # aligned like old_logprobs
    assert out["advantages"].tolist() == [-1.0, 1.0]
    # rows 0 and 2 use every prompt column and up to 4 response tokens: nothing to trim
    full, _ = trim_padding({k: v[[0, 2]] for k, v in b.items()})
    assert full["input_ids"].shape == (2, 8) and full["response_mask"].shape == (2, 4)
    # the trainer plans micro-batches in stable length order: real lengths 7, 4, 8, 5 -> rows 1, 3 | 0, 2
    assert [m.tolist() for m in plan_micro_batches(b["attention_mask"].sum(1), 2, None)] == [[1, 3], [0, 2]]


def test_trimmed_sorted_micro_batches_match_one_full_forward(pg, tiny):
    """compute_logprobs (length-sorted, trimmed micro-batches of 2, right-packed) == each row's own
    unpadded forward, and == one padded forward of all 4 rows."""
    tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
    b = _batch()
    lp = tr.compute_logprobs(b, temperature=1.0)
    prompts = [[1, 10, 11, 12], [1, 20, 21], [1, 10, 11, 12], [1, 20, 21]]
    outputs = [[30, 31, 2], [40], [32, 33, 34, 2], [41, 42]]
    with torch.no_grad():
        for i, (pr, o) in enumerate(zip(prompts, outputs)):
            logits = tr.model(input_ids=torch.tensor([pr + o]), use_cache=False).logits[0].float()
            own = torch.log_softmax(logits[len(pr) - 1:-1], -1).gather(-1, torch.tensor(o)[:, None])[:, 0]
            torch.testing.assert_close(lp[i, :len(o)], own, atol=1e-5, rtol=0)
        logits = response_logits_forward(tr.model, b["input_ids"], b["attention_mask"], 4)
        full = torch.log_softmax(logits, -1).gather(-1, b["input_ids"][:, -4:, None])[..., 0]
    mask = b["response_mask"]
    torch.testing.assert_close(lp * mask, full * mask, atol=1e-5, rtol=0)
    assert (lp[1, 2:] == 0).all()  # rows 1 and 3 share a micro-batch trimmed to 2 response columns


def test_tis_weights_scale_the_policy_loss(pg, tiny):
    """pi == pi_old on the first step: ratio 1, token loss -A; TIS weights multiply it (and its gradient)."""
    for w, expected in ((None, -0.2), (0.5, -0.1), (0.0, 0.0)):
        tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
        b = _batch()
        # advantages +1, +1, -1, +1 over 3, 1, 4, 2 loss tokens, token_mean: -(3 + 1 - 4 + 2) / 10 = -0.2
        b["advantages"] = torch.tensor([1.0, 1.0, -1.0, 1.0])
        b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
        if w is not None:
            b["tis_weights"] = torch.full(b["response_mask"].shape, w)
        m = tr.train_step(b, 1.0, mini_batch_size=4)
        assert m["policy/pg_loss"] == pytest.approx(expected, abs=1e-6), w
        assert (m["policy/grad_norm"] == 0.0) == (w == 0.0)


def test_nonfinite_steps_are_skipped_then_stop(pg, tiny):
    tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
    b = _batch()
    b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
    b["advantages"] = torch.tensor([float("nan"), 1.0, 1.0, 1.0])
    before = {k: v.clone() for k, v in tr.full_state_dict().items()}
    m = tr.train_step(b, 1.0, mini_batch_size=4)
    assert m["policy/skipped_steps"] == 1.0
    after = tr.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    tr.train_step(b, 1.0, mini_batch_size=4)
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row had a non-finite loss"):
        tr.train_step(b, 1.0, mini_batch_size=4)


def test_checkpoint_roundtrip(pg, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
    b = _batch()
    b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
    tr.train_step(b, 1.0, mini_batch_size=4)
    tr.save_checkpoint(tmp_path / "policy", tmp_path / "state.pt", tiny, {"step": 1})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    sd = tr.full_state_dict()
    torch.testing.assert_close(hf.state_dict()["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])
    tr2 = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
    extra = tr2.load_checkpoint(tmp_path / "policy", tmp_path / "state.pt")
    assert extra == {"step": 1}
    # identical next step from both
    for t in (tr, tr2):
        b2 = _batch()
        b2["old_logprobs"] = t.compute_logprobs(b2, 1.0)
        t.train_step(b2, 1.0, mini_batch_size=4)
    s1, s2 = tr.full_state_dict(), tr2.full_state_dict()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], atol=0, rtol=0)


class _Touch:
    """Unpickling this object would create ``path`` (an arbitrary callable run by pickle)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


def test_checkpoint_state_loads_weights_only_and_refuses_other_objects(pg, tiny, tmp_path):
    """The trainer state holds only tensors/containers/numbers (weights_only=True loads it as is), restores
    the python/numpy/torch RNG streams, a state with a pickled callable is refused before it runs, and a
    format-1 state (numpy's RNG tuple with an ndarray) still loads."""
    import pickle
    import random

    import numpy as np

    tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    tr.save_checkpoint(tmp_path / "policy", tmp_path / "state.pt", tiny, {"step": 2, "note": ("a", 1.5, None)})
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # no safe globals needed
    assert state["format"] == 2 and state["rng"]["numpy"]["keys"].shape == (624,)
    assert state["rng"]["numpy"]["keys"].dtype == torch.int64 and state["rng"]["numpy"]["name"] == "MT19937"

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert tr.load_checkpoint(tmp_path / "policy", tmp_path / "state.pt") == {"step": 2, "note": ("a", 1.5, None)}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect

    # a state carrying an arbitrary object: refused, and the object's callable never ran
    bad = dict(state, extra={"step": 2, "x": _Touch(tmp_path / "pwned")})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(pickle.UnpicklingError) as err:
        tr.load_checkpoint(tmp_path / "policy", tmp_path / "bad.pt")
    assert not (tmp_path / "pwned").exists()
    assert str(err.value).startswith(f"{tmp_path / 'bad.pt'}: refused to load the trainer state: it holds a Python "
                                     "object other than tensors, plain containers and numbers (refused global ")
    assert "trainer.resume_mode=none" in str(err.value)

    # format 1 (before weights_only): numpy's own state tuple
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    old = dict(state, rng={"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()})
    del old["format"]
    torch.save(old, tmp_path / "old.pt")
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert tr.load_checkpoint(tmp_path / "policy", tmp_path / "old.pt")["step"] == 2
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_host_reads_per_optimizer_step_do_not_grow_with_micro_batches(pg, tiny, monkeypatch):
    """Loss metrics and the non-finite check are read from the device once per optimizer step: the
    number of ``item`` / ``tolist`` / ``float(tensor)`` calls is the same for 4 micro-batches of 1 as
    for 1 micro-batch of 4 (the old loop read 4 floats per micro-batch)."""
    counts = []
    for micro in (1, 4):
        tr = PolicyTrainer(tiny, _tcfg(micro=micro, use_kl_loss=True), rank=0, world_size=1, device="cpu",
                           max_response_len=8)
        b = _batch()
        b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
        b["ref_logprobs"] = tr.compute_logprobs(b, 1.0, "ref")
        calls = []
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__float__"):
                orig = getattr(torch.Tensor, name)
                m.setattr(torch.Tensor, name,
                          lambda self, *a, _orig=orig, _name=name, **kw: (calls.append(_name), _orig(self, *a, **kw))[1])
            tr.train_step(b, 1.0, mini_batch_size=4)
        counts.append(len(calls))
    assert counts[0] == counts[1], counts


def test_cpu_adamw_is_foreach_on_dtensors_and_takes_the_first_adam_step(pg, tiny):
    """CPU: the multi-tensor (foreach) AdamW works on FSDP2 DTensor parameters. Adam's first step with
    zero weight decay moves each parameter by ``-lr * g / (|g| + eps)`` (bias corrections cancel);
    the reference model (KL on) stays fp32 on CPU."""
    tr = PolicyTrainer(tiny, _tcfg(lr=1e-3, use_kl_loss=True), rank=0, world_size=1, device="cpu", max_response_len=8)
    assert tr.optimizer.defaults["foreach"] is True and not tr.optimizer.defaults.get("fused")
    assert {p.dtype for p in tr.ref_model.parameters()} == {torch.float32}
    b = _batch()
    b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
    b["ref_logprobs"] = tr.compute_logprobs(b, 1.0, "ref")
    before = {n: p.full_tensor().clone() for n, p in tr.model.named_parameters()}
    grads = {}
    step = tr.optimizer.step

    def capture(*a, **kw):
        grads.update({n: p.grad.full_tensor().clone() for n, p in tr.model.named_parameters()})
        return step(*a, **kw)

    tr.optimizer.step = capture
    tr.train_step(b, 1.0, mini_batch_size=4)
    for n, p in tr.model.named_parameters():
        g = grads[n]
        torch.testing.assert_close(p.full_tensor(), before[n] - 1e-3 * g / (g.abs() + 1e-8), atol=1e-7, rtol=1e-6)


def test_host_buffers_are_allocated_once_and_reused():
    from rlctl.trainer import HostBuffers

    hb = HostBuffers(pin=False)
    a = hb.copy_in("w", torch.tensor([1.0, 2.0]))
    b = hb.copy_in("w", torch.tensor([3.0, 4.0]))
    assert a.data_ptr() == b.data_ptr() and b.tolist() == [3.0, 4.0] and hb.nbytes == 8
    c = hb.copy_in("w", torch.tensor([1, 2, 3]))  # new shape / dtype: a new buffer
    assert c.dtype == torch.int64 and c.tolist() == [1, 2, 3] and hb.nbytes == 24


def test_module_offload_reuses_its_host_buffers_and_keeps_the_parameters(pg, tiny):
    """move_module_to_host copies each FSDP2 shard into a buffer allocated on the first call; after the
    parameters got fresh storage (as the onload to the GPU gives them; here a clone), the next call
    copies into the same buffers. The Parameter objects (what the optimizer holds) never change, and
    the tied embedding / LM head weight gets one buffer."""
    from rlctl.trainer import HostBuffers, move_module_to_host

    tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
    b = _batch()
    before = tr.compute_logprobs(b, 1.0)
    params = list(tr.model.parameters())
    hb = HostBuffers(pin=False)
    move_module_to_host(tr.model, hb)
    ptrs = [p._local_tensor.data_ptr() for p in params]
    assert len(hb._bufs) == len(params) + 2  # + rotary inv_freq and original_inv_freq buffers
    assert sorted(ptrs) == sorted(buf.data_ptr() for k, buf in hb._bufs.items() if k < len(params))
    tr.model._apply(lambda t: t.clone())  # fresh storage, as after an onload
    assert all(p._local_tensor.data_ptr() != q for p, q in zip(params, ptrs))
    move_module_to_host(tr.model, hb)
    assert [p._local_tensor.data_ptr() for p in params] == ptrs and list(tr.model.parameters()) == params
    torch.testing.assert_close(tr.compute_logprobs(b, 1.0), before, atol=0, rtol=0)
    b["old_logprobs"] = before
    m = tr.train_step(b, 1.0, mini_batch_size=4)  # the optimizer still updates the model's parameters
    assert not torch.equal(tr.compute_logprobs(b, 1.0), before)
    assert m["memory/trainer_peak_reserved_bytes"] == 0.0 and m["memory/trainer_reserved_bytes_offloaded"] == 0.0
    assert m["memory/trainer_peak_allocated_bytes"] == 0.0
    assert tr.offload() == 0 and not tr.offloaded  # CPU: offload is a no-op


def test_host_copy_of_a_dtensor_stays_on_the_host_whatever_the_mesh_device(pg, tiny, monkeypatch):
    """The host copy of an FSDP2 shard keeps the buffer as its local tensor even when the mesh is a CUDA
    mesh. ``DTensor.from_local`` moves the local tensor to the mesh's device type: on the GPU the offload
    then copied every shard back and freed nothing. Here the CPU mesh is relabelled "cuda" for the call,
    so a move would fail (no CUDA) or leave another storage."""
    from rlctl.trainer import HostBuffers, to_host_buffer

    tr = PolicyTrainer(tiny, _tcfg(), rank=0, world_size=1, device="cpu", max_response_len=8)
    p = next(tr.model.parameters())
    hb = HostBuffers(pin=False)
    with monkeypatch.context() as m:
        m.setattr(type(p.device_mesh), "device_type", property(lambda self: "cuda"))
        host = to_host_buffer(hb, "w", p)
    assert host._local_tensor.data_ptr() == hb._bufs["w"].data_ptr()
    assert host._local_tensor.device.type == "cpu" and host.shape == p.shape and host.placements == p.placements
    assert not host.requires_grad
    torch.testing.assert_close(host._local_tensor, p._local_tensor, atol=0, rtol=0)


def test_nonfinite_step_is_diagnosed_down_to_the_module(pg, tiny, tmp_path):
    """A NaN planted in one weight of decoder block 1's MLP: the skipped step's diagnosis names that module's
    output as the first non-finite activation, writes the report and the micro-batch, and the step stays skipped."""
    import json

    from rlctl.trainer import _local

    tr = PolicyTrainer(tiny, _tcfg(micro=4), rank=0, world_size=1, device="cpu", max_response_len=8)
    tr.diagnosis_dir = tmp_path / "nonfinite"
    b = _batch()
    b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
    with torch.no_grad():
        _local(tr.model.model.layers[1].mlp.down_proj.weight)[0, 0] = float("nan")
    m = tr.train_step(b, 1.0, mini_batch_size=4)
    assert m["policy/skipped_steps"] == 1.0 and m["policy/nonfinite_diagnosis"] == 1.0
    report = json.loads((tmp_path / "nonfinite" / "step1_rank0.json").read_text())
    first = report["micro_batches"][0]
    assert report["first_bad_micro_batch"] == 0 and first["sequences"] == 4 and first["response_tokens"] == 10
    assert first["first_nonfinite_forward_output"].startswith("model.layers.1.mlp.down_proj (Linear")
    assert first["logprobs_finite"] is False and first["nonfinite_grad_param_count"] > 0
    saved = torch.load(tmp_path / "nonfinite" / "step1_rank0_mb0.pt", weights_only=True)
    assert saved["input_ids"].shape[0] == 4
    assert first["sequence_length"] == saved["input_ids"].shape[1]  # the trimmed length (cuDNN's NaN: 64 mod 128)


def test_trainer_forwards_exclude_cudnn_attention_on_cuda_only():
    """pytorch/pytorch#196678: cuDNN SDPA backward NaNs; trainer forwards pick flash / efficient / math on CUDA."""
    import contextlib

    from rlctl.trainer import trainer_attention

    assert isinstance(trainer_attention(torch.device("cpu")), contextlib.nullcontext)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with trainer_attention(torch.device("cuda")):  # only flags: no GPU needed to enter it
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() is before


def test_checkpointed_recompute_in_backward_runs_inside_the_trainer_attention_context(pg, tiny, monkeypatch):
    """Gradient checkpointing re-runs each layer's attention inside backward(): that call must see the same SDPA
    backends as the forward (else cuDNN attention, and its NaN, come back for the recompute)."""
    import contextlib

    import rlctl.trainer as trainer_mod
    from rlctl.testing import trainer_section

    depth, calls = [0], []

    @contextlib.contextmanager
    def counting(device):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(depth[0] > 0)
        return real_sdpa(*a, **k)

    tr = PolicyTrainer(tiny, trainer_section(base=_tcfg(micro=4), gradient_checkpointing=True), rank=0, world_size=1,
                       device="cpu", max_response_len=8)
    b = _batch()
    b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
    monkeypatch.setattr(trainer_mod, "trainer_attention", counting)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    tr.train_step(b, 1.0, mini_batch_size=4)
    # 2 layers of the tiny model: 2 SDPA calls in the forward + 2 recomputed in the backward, all inside
    assert len(calls) == 4 and all(calls)


def test_every_micro_batch_forward_runs_in_the_trainer_attention_context(pg, tiny, monkeypatch):
    import contextlib

    import rlctl.trainer as trainer_mod

    entered = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device.type)
        yield

    tr = PolicyTrainer(tiny, _tcfg(micro=2), rank=0, world_size=1, device="cpu", max_response_len=8)
    b = _batch()
    b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
    monkeypatch.setattr(trainer_mod, "trainer_attention", recording)
    tr.train_step(b, 1.0, mini_batch_size=4)
    assert entered == ["cpu"] * 4  # 4 sequences, micro-batches of 2: each one's forward and backward
    tr.compute_logprobs(b, 1.0)
    assert entered == ["cpu"] * 6  # and the log-prob pass's two forwards (micro-batch 2 as configured here)


def test_lr_schedule_counts_optimizer_steps_and_is_checkpointed(pg, tiny, tmp_path):
    """cosine_with_warmup (transformers' cosine), 1 warmup step, max_steps 2 x (2 prompts / mini-batch 1) = 4
    optimizer steps: lr factors 0, 1, 0.5 (1 + cos(pi/3)) = 0.75, 0.5 (1 + cos(2 pi/3)) = 0.25."""
    tcfg = _tcfg(scheduler="cosine_with_warmup", warmup=1, max_steps=2)
    tr = PolicyTrainer(tiny, tcfg, rank=0, world_size=1, device="cpu", max_response_len=8)
    b = _batch()
    b["old_logprobs"] = tr.compute_logprobs(b, 1.0)
    m = tr.train_step(b, 1.0, mini_batch_size=2)  # 2 optimizer steps at lr 0 and 1e-2; logs the last one's
    assert m["policy/lr"] == pytest.approx(1e-2)
    tr.save_checkpoint(tmp_path / "policy", tmp_path / "state.pt", tiny, {"step": 1})
    tr2 = PolicyTrainer(tiny, tcfg, rank=0, world_size=1, device="cpu", max_response_len=8)
    assert tr2.optimizer.param_groups[0]["lr"] == 0.0  # a fresh schedule starts its warmup at 0
    tr2.load_checkpoint(tmp_path / "policy", tmp_path / "state.pt")
    assert tr2.optimizer.param_groups[0]["lr"] == pytest.approx(0.75e-2)
    for t in (tr, tr2):
        assert t.train_step(b, 1.0, mini_batch_size=2)["policy/lr"] == pytest.approx(0.25e-2)
    with pytest.raises(ValueError, match="scheduler=linear decays over trainer.max_steps; set it"):
        PolicyTrainer(tiny, _tcfg(scheduler="linear"), rank=0, world_size=1, device="cpu", max_response_len=8)
