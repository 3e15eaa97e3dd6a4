"""The transformers generator backend on the tiny random Llama (CPU, float32, a few seconds)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlctl.generator import Sampling, load_generator
from rlctl.generator.hf import ERR_STALE, HFGenerator
from rlctl.testing import build_tiny_llama

PROMPTS = [
    [1, 120, 118, 104, 117, 13, 107, 104, 111, 111, 114, 2, 13, 1, 100, 118, 118, 13],
    [1, 50, 51, 52],
    [1, 7, 9, 11, 13, 15, 17, 19, 21, 23],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # initializer_range 0.3 gives peaked, varied greedy outputs (0.02 repeats the last token).
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0, initializer_range=0.3)


@pytest.fixture(scope="module")
def gen(tiny):
    g = HFGenerator(str(tiny))
    yield g
    g.shutdown()


def greedy(n, **kw):
    return Sampling(max_new_tokens=n, temperature=0.0, stop_token_ids=kw.pop("stop", (258,)), **kw)


def manual_logprobs(model, prompt, response, temperature):
    """What the trainer computes: one full forward over prompt + response, fp32."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(logits / scale, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return lp[pos, torch.tensor(response)]


def test_load_by_name_and_unknown_kwarg(tiny):
    g = load_generator("hf", model_path=str(tiny), max_batch_size=2)
    assert isinstance(g, HFGenerator) and g.state == "ready"
    assert g.default_stop_token_ids == (2,) and g.pad_token_id == 0
    g.shutdown()
    with pytest.raises(TypeError, match="mem_fraction"):
        HFGenerator(str(tiny), mem_fraction=0.5)


def test_lengths_and_finish_reasons(gen):
    out = gen.generate(PROMPTS, greedy(7))
    assert [len(ids) for ids in out.output_ids] == [7, 7, 7]
    assert [len(lp) for lp in out.logprobs] == [7, 7, 7]
    assert out.finish_reasons == ["length"] * 3
    assert all(lp <= 0 for lps in out.logprobs for lp in lps)
    assert out.stats["num_output_tokens"] == 21 and out.stats["num_prompts"] == 3


def test_stop_token_ends_response_and_is_kept(gen):
    full = gen.generate(PROMPTS, greedy(12))
    ids0 = full.output_ids[0]
    stop, k = ids0[4], ids0.index(ids0[4])  # a token greedy emits; it first appears at k <= 4
    out = gen.generate(PROMPTS, greedy(12, stop=(stop,)))
    assert out.output_ids[0] == ids0[: k + 1] and out.finish_reasons[0] == "stop"
    assert out.logprobs[0] == pytest.approx(full.logprobs[0][: k + 1], abs=1e-6)
    for row in (1, 2):  # the others stop too where they emit it, or run to the length
        ids = full.output_ids[row]
        if stop in ids:
            assert out.output_ids[row] == ids[: ids.index(stop) + 1] and out.finish_reasons[row] == "stop"
        else:
            assert out.output_ids[row] == ids and out.finish_reasons[row] == "length"


def test_empty_stop_ids_use_generation_config_eos(tiny):
    g = HFGenerator(str(tiny))
    assert g.default_stop_token_ids == (2,)  # <|im_end|> from generation_config.json
    emitted = g.generate(PROMPTS, greedy(12)).output_ids[0][3]
    g.default_stop_token_ids = (emitted,)
    out = g.generate(PROMPTS, Sampling(max_new_tokens=12, temperature=0.0))
    assert out.output_ids[0][-1] == emitted and out.finish_reasons[0] == "stop"
    assert out.output_ids == g.generate(PROMPTS, greedy(12, stop=(emitted,))).output_ids
    g.shutdown()


def test_greedy_is_deterministic(gen):
    a = gen.generate(PROMPTS, greedy(10))
    b = gen.generate(PROMPTS, greedy(10))
    assert a.output_ids == b.output_ids and a.logprobs == b.logprobs


def test_seeded_sampling_reproducible(tiny):
    s = Sampling(max_new_tokens=10, temperature=1.0, stop_token_ids=(258,))
    g1, g2 = HFGenerator(str(tiny), seed=7), HFGenerator(str(tiny), seed=7)
    run1 = [g1.generate(PROMPTS, s).output_ids for _ in range(2)]
    run2 = [g2.generate(PROMPTS, s).output_ids for _ in range(2)]
    assert run1 == run2  # a run is reproducible
    assert run1[0] != run1[1]  # successive calls differ
    g3 = HFGenerator(str(tiny), seed=8)
    assert g3.generate(PROMPTS, s).output_ids != run1[0]
    fixed = Sampling(max_new_tokens=10, temperature=1.0, stop_token_ids=(258,), seed=123)
    assert g1.generate(PROMPTS, fixed).output_ids == g2.generate(PROMPTS, fixed).output_ids
    assert g1.generate(PROMPTS, fixed).output_ids == g3.generate(PROMPTS, fixed).output_ids
    # sampling does not disturb the caller's global RNG
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    g1.generate(PROMPTS, s)
    assert torch.equal(torch.rand(3), expected)
    for g in (g1, g2, g3):
        g.shutdown()


def test_left_padding_and_chunking(tiny, gen):
    short, long = PROMPTS[1], PROMPTS[0]
    alone = gen.generate([short], greedy(10))
    batched = gen.generate([long, short], greedy(10))
    assert batched.output_ids[1] == alone.output_ids[0]
    assert batched.logprobs[1] == pytest.approx(alone.logprobs[0], abs=1e-5)
    g1 = HFGenerator(str(tiny), max_batch_size=1)
    one_by_one = g1.generate(PROMPTS, greedy(10))
    together = gen.generate(PROMPTS, greedy(10))
    assert one_by_one.output_ids == together.output_ids
    for a, b in zip(one_by_one.logprobs, together.logprobs):
        assert a == pytest.approx(b, abs=1e-5)
    g1.shutdown()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, -1, 1.0), (1.0, -1, 1.0), (0.7, 20, 0.9), (1.6, -1, 1.0)])
def test_logprobs_match_full_forward(gen, temperature, top_k, top_p):
    s = Sampling(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p, stop_token_ids=(258,), seed=5)
    out = gen.generate(PROMPTS, s)
    for prompt, ids, lps in zip(PROMPTS, out.output_ids, out.logprobs):
        ref = manual_logprobs(gen.model, prompt, ids, temperature)
        assert torch.allclose(torch.tensor(lps), ref, atol=1e-4), (lps, ref)


def test_temperature_scales_logprobs(gen):
    tokens = gen.generate(PROMPTS[:1], greedy(8)).output_ids[0]
    unscaled = manual_logprobs(gen.model, PROMPTS[0], tokens, 1.0)
    # greedy tokens sampled at T=0.5 with top_k=1 (forced argmax): logprobs are under logits/0.5
    out = gen.generate(PROMPTS[:1], Sampling(max_new_tokens=8, temperature=0.5, top_k=1, stop_token_ids=(258,)))
    assert out.output_ids[0] == tokens
    scaled = torch.tensor(out.logprobs[0])
    assert torch.allclose(scaled, manual_logprobs(gen.model, PROMPTS[0], tokens, 0.5), atol=1e-4)
    assert (scaled > unscaled).all()  # sharper distribution: the argmax gets more mass


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_cuts_reduce_sampling_to_greedy(gen, kw):
    ref = gen.generate(PROMPTS, greedy(8)).output_ids
    out = gen.generate(PROMPTS, Sampling(max_new_tokens=8, temperature=1.0, stop_token_ids=(258,), **kw))
    assert out.output_ids == ref


def test_checkpoint_sampling_defaults_do_not_leak(tiny, tmp_path, gen):
    other = tmp_path / "model"
    shutil.copytree(tiny, other)
    cfg = json.loads((other / "generation_config.json").read_text())
    cfg.update(repetition_penalty=50.0, top_k=1, do_sample=True, no_repeat_ngram_size=1)
    (other / "generation_config.json").write_text(json.dumps(cfg))
    g = HFGenerator(str(other))
    s = Sampling(max_new_tokens=10, temperature=1.0, stop_token_ids=(258,), seed=11)
    assert g.generate(PROMPTS, greedy(10)).output_ids == gen.generate(PROMPTS, greedy(10)).output_ids
    assert g.generate(PROMPTS, s).output_ids == gen.generate(PROMPTS, s).output_ids
    g.shutdown()


def test_state_machine(tiny):
    g = HFGenerator(str(tiny))
    s = greedy(3)
    assert g.state == "ready"
    g.generate(PROMPTS, s)
    g.sleep()
    assert g.state == "asleep"
    with pytest.raises(RuntimeError, match="generator is asleep"):
        g.generate(PROMPTS, s)
    with pytest.raises(RuntimeError, match="weights are asleep"):
        g.update_weights([])
    g.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="asleep"):  # kv_cache still asleep
        g.generate(PROMPTS, s)
    g.wake_up(["kv_cache"])
    assert g.state == "stale"
    with pytest.raises(RuntimeError, match=ERR_STALE):
        g.generate(PROMPTS, s)
    g.update_weights([])
    assert g.state == "ready"
    g.generate(PROMPTS, s)
    g.sleep()
    g.wake_up()  # None = all tags, weights included
    with pytest.raises(RuntimeError, match="weights were woken but not updated: call update_weights before generate"):
        g.generate(PROMPTS, s)
    g.update_weights([("lm_head.weight", g.model.lm_head.weight.detach().clone())])
    g.generate(PROMPTS, s)
    g.wake_up(["weights", "kv_cache", "cuda_graph"])  # already awake: no change
    assert g.state == "ready"
    with pytest.raises(ValueError, match="unknown wake_up tags"):
        g.wake_up(["kv"])
    g.shutdown()
    g.shutdown()
    for call in (lambda: g.generate(PROMPTS, s), g.sleep, g.wake_up, lambda: g.update_weights([])):
        with pytest.raises(RuntimeError, match="shut down"):
            call()


def test_update_weights_changes_and_restores_outputs(tiny):
    g = HFGenerator(str(tiny))
    s = Sampling(max_new_tokens=10, temperature=1.0, stop_token_ids=(258,), seed=9)
    before = g.generate(PROMPTS, s)
    original = [(n, p.detach().clone()) for n, p in g.model.state_dict().items()]
    assert "lm_head.weight" in dict(original) and "model.embed_tokens.weight" in dict(original)
    gen_ = torch.Generator().manual_seed(1)
    noisy = [(n, t + 0.5 * torch.randn(t.shape, generator=gen_)) for n, t in original if n != "lm_head.weight"]
    for start in range(0, len(noisy), 4):  # buckets
        g.update_weights(noisy[start : start + 4])
    changed = g.generate(PROMPTS, s)
    assert changed.output_ids != before.output_ids
    # tied embeddings: writing lm_head.weight writes the embedding too
    emb = dict(original)["model.embed_tokens.weight"]
    g.update_weights([("lm_head.weight", emb)])
    assert torch.equal(g.model.model.embed_tokens.weight, emb)
    g.update_weights(original)
    after = g.generate(PROMPTS, s)
    assert after.output_ids == before.output_ids and after.logprobs == before.logprobs
    g.shutdown()


def test_update_weights_errors_copy_nothing(gen):
    ref = gen.model.model.norm.weight.detach().clone()
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        gen.update_weights([("model.norm.weight", ref + 1), ("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight"):
        gen.update_weights([("model.norm.weight", ref + 1), ("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3))])
    assert torch.equal(gen.model.model.norm.weight, ref)
    assert gen.state == "ready"


def test_bad_inputs(gen):
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[1, 2], []], greedy(3))
    with pytest.raises(ValueError, match="outside"):
        gen.generate([[1, 100000]], greedy(3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[1]], greedy(0))
