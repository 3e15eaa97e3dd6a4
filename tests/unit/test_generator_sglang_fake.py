"""CPU tests of SGLangGenerator's state machine and sleep check, against a fake ``sglang`` module."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from rlctl.generator import Sampling
from rlctl.weight_sync import IPCPayload

GiB = 1 << 30


class FakeEngine:
    """Mimics sglang.Engine's calls used by the wrapper; memory is a counter shared with mem_get_info."""

    mem = {"free": 100 * GiB}
    leak = False  # when True, release frees nothing (a broken memory saver)

    def __init__(self, **kw):
        self.kw = kw
        self.sizes = {"weights": 1 * GiB, "kv_cache": 40 * GiB, "cuda_graph": 0}
        self.released: set[str] = set()
        self.loads: list = []
        FakeEngine.mem["free"] -= sum(self.sizes.values()) + GiB // 2  # + per-process overhead

    def release_memory_occupation(self, tags=None):
        for t in tags or list(self.sizes):
            self.released.add(t)
            if not FakeEngine.leak:
                FakeEngine.mem["free"] += self.sizes[t]

    def resume_memory_occupation(self, tags=None):
        for t in tags or list(self.sizes):
            self.released.remove(t)  # KeyError, as SGLang's scheduler fails
            FakeEngine.mem["free"] -= self.sizes[t]

    def generate(self, input_ids, sampling_params, return_logprob):
        assert not self.released
        assert return_logprob
        sp = sampling_params if isinstance(sampling_params, dict) else sampling_params[0]
        n = sp["max_new_tokens"]
        out = []
        for i, p in enumerate(input_ids):
            stop = i % 2 == 0 and sp.get("stop_token_ids")
            ids = [5] * (n - 1) + ([sp["stop_token_ids"][0]] if stop else [7])
            out.append({"output_ids": ids, "meta_info": {
                "finish_reason": {"type": "stop" if stop else "length"},
                "output_token_logprobs": [(-0.5, t, None) for t in ids]}})
        return out

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        assert "weights" not in self.released
        self.loads.append((named_tensors, load_format, flush_cache))
        return True, "ok"

    def shutdown(self):
        FakeEngine.mem["free"] += 10 * GiB


@pytest.fixture
def fake(monkeypatch):
    mod = types.ModuleType("sglang")
    mod.Engine = FakeEngine
    monkeypatch.setitem(sys.modules, "sglang", mod)
    FakeEngine.mem["free"] = 100 * GiB
    FakeEngine.leak = False
    import rlctl.generator.sglang as g

    monkeypatch.setattr(g, "_free_bytes", lambda: FakeEngine.mem["free"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(g.SGLangGenerator, "RELEASE_POLL_S", 0.1)
    return g


def _payload():
    return IPCPayload(data=b"\x80\x04xx", load_format="flattened_bucket", names=("a",), nbytes=8)


def test_colocated_cycle(fake):
    gen = fake.SGLangGenerator("/m", disable_cuda_graph=True)
    eng = gen.engine
    assert eng.kw["skip_tokenizer_init"] is True and eng.kw["attention_backend"] == "triton"
    assert gen.asleep and eng.released == {"weights", "kv_cache", "cuda_graph"}
    assert gen.last_stats["sleep_freed_bytes"] == 41 * GiB
    s = Sampling(max_new_tokens=4, temperature=1.0, stop_token_ids=(2,))
    with pytest.raises(RuntimeError, match="released"):
        gen.generate([[1, 2]], s)
    gen.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="released"):
        gen.generate([[1, 2]], s)
    with pytest.raises(RuntimeError, match="not released"):
        gen.wake_up(["weights"])
    gen.wake_up(["kv_cache"])  # also wakes cuda_graph
    assert not gen.asleep
    with pytest.raises(RuntimeError, match="no update_weights"):
        gen.generate([[1, 2]], s)
    gen.update_weights(_payload())
    assert eng.loads[-1][1:] == ("flattened_bucket", True)  # kv resident: flush
    out = gen.generate([[1, 2], [3]], s)
    assert out.finish_reasons == ["stop", "length"]
    assert out.output_ids[0][-1] == 2 and len(out.logprobs[1]) == 4
    gen.sleep()
    assert gen.last_stats["sleep_freed_bytes"] == 41 * GiB and gen.last_stats["sleep_expected_bytes"] == 41 * GiB
    # the loop's order: weights, push (no flush while the KV cache is released), kv
    gen.wake_up(["weights"])
    gen.update_weights([_payload(), _payload()])
    assert [x[2] for x in eng.loads[-2:]] == [False, False]
    gen.wake_up(["kv_cache"])
    gen.generate([[1]], s)
    assert gen.last_stats["update_weights_bytes"] == 16
    gen.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        gen.generate([[1]], s)


def test_update_refused_while_weights_released(fake):
    gen = fake.SGLangGenerator("/m")
    with pytest.raises(RuntimeError, match="weights are released"):
        gen.update_weights(_payload())
    with pytest.raises(ValueError, match="unknown wake tags"):
        gen.wake_up(["kv"])


def test_sleep_that_frees_nothing_raises(fake):
    gen = fake.SGLangGenerator("/m")
    gen.wake_up()
    gen.update_weights(_payload())
    FakeEngine.leak = True
    with pytest.raises(RuntimeError, match="released only"):
        gen.sleep()


def test_not_colocated_starts_awake(fake):
    gen = fake.SGLangGenerator("/m", colocated=False)
    assert not gen.asleep
    out = gen.generate([[1, 2, 3]], Sampling(max_new_tokens=3, temperature=0.0))
    assert out.finish_reasons == ["length"]


def test_idle_engine_sleeps_on_its_sockets_only_when_asked(fake):
    # SGLang's sleep_on_idle: off by default (SGLang's own default), passed through when asked for
    assert fake.SGLangGenerator("/m").engine.kw["sleep_on_idle"] is False
    assert fake.SGLangGenerator("/m", sleep_on_idle=True).engine.kw["sleep_on_idle"] is True


def test_config_key_reaches_the_engine_arguments():
    from rlctl.config import load_config
    from rlctl.job.cluster import generator_kwargs

    cfg = load_config(preset="gsm8k-h200", backend="sglang").cfg
    assert generator_kwargs(cfg, "cuda")["sleep_on_idle"] is False
    on = load_config(preset="gsm8k-h200", backend="sglang", overrides=["generator.sglang.sleep_on_idle=true"]).cfg
    assert generator_kwargs(on, "cuda")["sleep_on_idle"] is True


def test_foreign_options_rejected(fake):
    with pytest.raises(ValueError, match="mem_fraction_static"):
        fake.SGLangGenerator("/m", gpu_memory_utilization=0.5)
    with pytest.raises(ValueError, match="enable_memory_saver"):
        fake.SGLangGenerator("/m", enable_memory_saver=False)


def test_tp_engine_gets_one_handle_per_tp_rank_in_order(fake):
    from rlctl.weight_sync import TensorParallelPayload

    gen = fake.SGLangGenerator("/m", tp_size=2, colocated=False)
    assert gen.engine.kw["tp_size"] == 2
    h0 = IPCPayload(data=b"rank0", load_format="flattened_bucket", names=("a",), nbytes=8)
    h1 = IPCPayload(data=b"rank1", load_format="flattened_bucket", names=("a",), nbytes=8)
    gen.update_weights(TensorParallelPayload((h0, h1)))
    assert gen.engine.loads[-1] == ([b"rank0", b"rank1"], "flattened_bucket", True)
    assert gen.last_stats["update_weights_bytes"] == 8  # one copy per TP rank is counted once
    # a single-rank payload goes to both ranks (what TP 1 callers send)
    gen.update_weights(h0)
    assert gen.engine.loads[-1][0] == [b"rank0", b"rank0"]
    with pytest.raises(ValueError, match="a TensorParallelPayload of 1 ranks for an engine of tp_size=2"):
        gen.update_weights(TensorParallelPayload((h0,)))
    with pytest.raises(ValueError, match="the 2 TP ranks' payloads differ"):
        TensorParallelPayload((h0, IPCPayload(data=b"x", load_format=None, names=("a",), nbytes=8)))


def test_tp1_sends_one_entry_as_before(fake):
    gen = fake.SGLangGenerator("/m", colocated=False)
    gen.update_weights(_payload())
    assert gen.engine.loads[-1] == ([b"\x80\x04xx"], "flattened_bucket", True)
