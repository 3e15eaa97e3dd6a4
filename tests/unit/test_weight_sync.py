"""CPU tests of rlctl.weight_sync: FSDP2 (gloo, 1 process) bucketed full weights == unsharded state dict."""

from __future__ import annotations


import pytest
import torch

from rlctl.testing import free_port
from rlctl.weight_sync import bucket_metadata, hf_param_name, iter_weight_buckets, serialize_for_ipc

transformers = pytest.importorskip("transformers")


def _tiny_llama(tie: bool = True) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="module")
def gloo_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _expected(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {k: v.detach().clone().to(dtype) for k, v in sd.items() if "rotary_emb" not in k}
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def test_hf_param_name_strips_wrappers():
    assert hf_param_name("_orig_mod.model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert hf_param_name("_fsdp_wrapped_module.model.norm.weight") == "model.norm.weight"
    assert hf_param_name("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("tie", [True, False])
def test_fsdp2_buckets_match_unsharded(gloo_group, tie):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = _tiny_llama(tie)
    expected = _expected(model, torch.bfloat16)
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert any(isinstance(p, DTensor) for p in model.parameters())

    seen_orders = []
    for bucket_bytes in (1024, 64 * 1024, 1 << 30):
        buckets = list(iter_weight_buckets(model, bucket_bytes, dtype=torch.bfloat16))
        got: dict[str, torch.Tensor] = {}
        for b in buckets:
            size = sum(t.numel() * t.element_size() for _, t in b)
            assert size <= bucket_bytes or len(b) == 1, (bucket_bytes, size, len(b))
            for name, t in b:
                assert not isinstance(t, DTensor)
                assert name not in got
                got[name] = t
        assert set(got) == set(expected), set(got) ^ set(expected)
        for name, t in got.items():
            assert t.dtype == torch.bfloat16
            assert t.shape == expected[name].shape
            assert torch.equal(t, expected[name]), name
        seen_orders.append(list(got))
        if bucket_bytes == 1024:
            assert len(buckets) > 5
        if bucket_bytes == 1 << 30:
            assert len(buckets) == 1
    assert seen_orders[0] == seen_orders[1] == seen_orders[2]
    # HF names, as SGLang's loader expects them
    assert "model.embed_tokens.weight" in seen_orders[0]
    assert "model.layers.1.mlp.down_proj.weight" in seen_orders[0]
    assert ("lm_head.weight" in seen_orders[0]) == (not tie)


class _Wrap(torch.nn.Module):
    """Stands in for wrappers whose state dict keeps their prefix (torch.compile's ``_orig_mod``)."""

    def __init__(self, inner: torch.nn.Module, attr: str):
        super().__init__()
        setattr(self, attr, inner)
        self.config = getattr(inner, "config", None)


def test_wrapped_names_are_mapped():
    model = _tiny_llama(True)
    expected = _expected(model, torch.float32)
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = _Wrap(layer, "_checkpoint_wrapped_module")
    wrapped = _Wrap(model, "_orig_mod")
    keys = list(wrapped.state_dict())
    assert any("_checkpoint_wrapped_module" in k for k in keys) and all(k.startswith("_orig_mod.") for k in keys)
    got = {n: t for b in iter_weight_buckets(wrapped, 4096) for n, t in b}
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_dtype_none_keeps_dtype_and_bad_size():
    model = _tiny_llama(False)
    got = [t for b in iter_weight_buckets(model, 1 << 20) for _, t in b]
    assert all(t.dtype == torch.float32 for t in got)
    with pytest.raises(ValueError):
        next(iter_weight_buckets(model, 0))


def test_bucket_metadata_and_cpu_refused():
    bucket = [("a.weight", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b.bias", torch.zeros(4))]
    names, dtypes, shapes = bucket_metadata(bucket)
    assert names == ["a.weight", "b.bias"] and dtypes == ["bfloat16", "float32"] and shapes == [[2, 3], [4]]
    with pytest.raises(ValueError, match="CUDA"):
        serialize_for_ipc(bucket)


# ------------------------------------------------------------- split placement: broadcast over a group

def _receiver(port: int, name: str, metas, load_format, q) -> None:  # a spawned process (engine side)
    from rlctl.weight_sync import join_weight_group, receive_bucket

    group = join_weight_group("127.0.0.1", port, 2, 1, name, timeout_s=30, backend="gloo", side="engine")
    got = receive_bucket(*metas, group, load_format=load_format, timeout_s=30)
    q.put([(n, t.tolist(), str(t.dtype)) for n, t in got])


@pytest.mark.parametrize("load_format", ["flattened_bucket", None])
def test_broadcast_bucket_reaches_the_receiver_exactly(load_format):
    """Trainer (this process, rank 0) broadcasts a mixed-dtype bucket; the engine side (rank 1, another
    process, no default process group) receives byte-identical tensors under the same names."""
    import multiprocessing as mp

    from rlctl.weight_sync import broadcast_bucket, init_trainer_weight_group

    bucket = [("model.norm.weight", torch.tensor([1.5, -2.25, 3.0])),
              ("model.embed_tokens.weight", torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) / 4),
              ("lm_head.bias", torch.tensor([7], dtype=torch.int64))]
    port, name = free_port(), f"t-{load_format}"  # a group name is used once per process
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(port, name, bucket_metadata(bucket), load_format, q))
    proc.start()
    try:
        group = init_trainer_weight_group("127.0.0.1", port, 2, name, timeout_s=30, backend="gloo")
        broadcast_bucket(bucket, group, load_format=load_format, timeout_s=30)
        got = q.get(timeout=60)
    finally:
        proc.join(30)
    assert got == [("model.norm.weight", [1.5, -2.25, 3.0], "torch.float32"),
                   ("model.embed_tokens.weight", [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]], "torch.bfloat16"),
                   ("lm_head.bias", [7], "torch.int64")]


def _silent_receiver(port: int, name: str, up, down) -> None:  # joins the group, never receives (a failed engine)
    from rlctl.weight_sync import join_weight_group

    join_weight_group("127.0.0.1", port, 2, 1, name, timeout_s=30, backend="gloo", side="engine")
    up.put("joined")
    down.get(timeout=60)  # hold the group open until the trainer side has given up


def test_broadcast_stops_when_check_reports_a_failed_engine():
    """The engine joined but failed before receiving: ``check`` (in the loop: the engine's Ray call has
    ended with an error) ends the trainer's wait within a second instead of after ``timeout_s`` (60 s)."""
    import multiprocessing as mp
    import time

    from rlctl.weight_sync import WeightSyncError, broadcast_bucket, init_trainer_weight_group

    port, name = free_port(), "t-check"
    ctx = mp.get_context("spawn")
    up, down = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_silent_receiver, args=(port, name, up, down))
    proc.start()
    calls = []

    def check():
        calls.append(time.monotonic())
        if len(calls) == 5:
            raise RuntimeError("engine side: generator-0 raised KeyError('model.norm.weight')")

    try:
        group = init_trainer_weight_group("127.0.0.1", port, 2, name, timeout_s=30, backend="gloo")
        assert up.get(timeout=30) == "joined"
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError) as e:
            broadcast_bucket([("w", torch.ones(1 << 20))], group, timeout_s=60, check=check)
        waited = time.monotonic() - t0
    finally:
        down.put("done")
        proc.join(30)
    assert str(e.value).startswith("trainer side: broadcast of 1 tensors (w ...) failed: RuntimeError: engine side: "
                                   "generator-0 raised KeyError('model.norm.weight')")
    assert len(calls) == 5 and waited < 5.0  # 4 checks ~50 ms apart, then the raise


def test_weight_group_timeout_names_the_side():
    """Nobody else joins: the rendezvous gives up after the timeout with an error naming the side."""
    from rlctl.weight_sync import WeightSyncError, join_weight_group

    with pytest.raises(WeightSyncError) as e:
        join_weight_group("127.0.0.1", free_port(), 2, 1, "lonely", timeout_s=2, backend="gloo", side="engine")
    msg = str(e.value)
    assert msg.startswith("engine side: could not form weight-update group 'lonely' at tcp://127.0.0.1:")
    assert "as rank 1 (world_size=2, backend=gloo) within 2s" in msg
