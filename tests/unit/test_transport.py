"""Weight transports: chosen in one place, which engines each trainer rank serves, and the tensor-parallel
gather of CUDA IPC handles (trainer ranks as threads, engines as recording fakes)."""

import threading

import pytest
import torch

from rlctl.job import transport as T
from rlctl.job.actors import TrainerWorker
from rlctl.job.transport import Broadcast, CudaIpc, ObjectStore, choose_transport
from rlctl.weight_sync import IPCPayload, TensorParallelPayload


def test_choice_by_backend_and_placement():
    assert choose_transport("sglang", colocated=True) == CudaIpc()
    assert choose_transport("hf", colocated=True) == ObjectStore()
    assert choose_transport("sglang", colocated=False) == Broadcast()
    assert choose_transport("hf", colocated=False) == Broadcast()
    assert [t.name for t in (CudaIpc(), ObjectStore(), Broadcast())] == ["ipc", "object", "broadcast"]


def test_colocated_engine_j_is_served_by_rank_j_mod_world():
    gens = ["g0", "g1", "g2", "g3", "g4"]
    assert CudaIpc().targets(gens, 2) == [["g0", "g2", "g4"], ["g1", "g3"]]
    assert ObjectStore().targets(gens[:2], 4) == [["g0"], ["g1"], [], []]


def test_broadcast_sends_from_rank_0_only():
    assert Broadcast().targets(["g0", "g1"], 3) == [["g0", "g1"], [], []]


# ------------------------------------------------------------------ tensor-parallel engines (TP = N > 1)


def test_choice_passes_the_tp_size_and_refuses_tp_for_hf():
    assert choose_transport("sglang", colocated=True, tp_size=2) == CudaIpc(2)
    assert CudaIpc(2).gathers and not CudaIpc().gathers and not Broadcast().gathers and not ObjectStore().gathers
    assert choose_transport("sglang", colocated=False, tp_size=4) == Broadcast()
    with pytest.raises(ValueError, match="generator.inference_engine_tensor_parallel_size=2: tensor-parallel engines "
                                         "need generator.backend=sglang"):
        choose_transport("hf", colocated=True, tp_size=2)


def test_tp_engine_j_is_served_by_rank_j_times_n():
    assert CudaIpc(2).targets(["g0", "g1"], 4) == [["g0"], [], ["g1"], []]
    assert CudaIpc(4).targets(["g0", "g1"], 8) == [["g0"], [], [], [], ["g1"], [], [], []]


def test_split_weight_group_ranks_cover_every_tp_rank():
    # 2 engines of TP 2: trainer rank 0, engine 0 ranks 1-2, engine 1 ranks 3-4
    assert T.weight_group_ranks(2, 2) == (5, [1, 3])
    assert T.weight_group_ranks(3, 1) == (4, [1, 2, 3])  # TP 1: as before


class FakeEngine:
    """An engine actor handle: ``update_weights.remote(p)`` records ``p`` and returns it as the 'ref'."""

    def __init__(self, name: str) -> None:
        self.name, self.got = name, []
        self.update_weights = self  # so that ``engine.update_weights.remote(p)`` works

    def remote(self, payload):
        self.got.append(payload)
        return payload


class FakeRank:
    """The parts of a TrainerWorker a transport uses; all_gather_object / barrier across threads."""

    def __init__(self, rank: int, world: "FakeWorld") -> None:
        self.rank, self.world = rank, world

    def all_gather_object(self, obj):
        self.world.slots[self.rank] = obj
        self.world.sync.wait()
        out = list(self.world.slots)
        self.world.sync.wait()
        return out

    def barrier(self):
        self.world.barriers[self.rank] += 1
        self.world.sync.wait()


class FakeWorld:
    def __init__(self, n: int) -> None:
        self.slots, self.barriers, self.sync = [None] * n, [0] * n, threading.Barrier(n, timeout=10)


def _fake_serialize(bucket):
    # the data says which rank's GPU the handles point into (each rank's tensors hold its rank)
    rank = int(bucket[0][1][0])
    return IPCPayload(data=f"handles of rank {rank}".encode(), load_format="flattened_bucket",
                      names=tuple(n for n, _ in bucket), nbytes=4 * sum(t.numel() for _, t in bucket))


def _run_ranks(transport, world_size, engines, monkeypatch):
    import rlctl.weight_sync as ws

    monkeypatch.setattr(ws, "serialize_for_ipc", _fake_serialize)
    monkeypatch.setattr(T, "_wait_all", lambda refs: list(refs))
    world = FakeWorld(world_size)
    targets = transport.targets(engines, world_size)
    errors = []

    def rank(r):
        try:
            for step in range(2):  # two buckets
                bucket = [(f"w{step}", torch.full((3,), float(r)))]
                if targets[r] or transport.gathers:
                    transport.send(bucket, targets[r], FakeRank(r, world))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    return world


def test_colocated_tp2_each_engine_gets_its_ranks_handles_in_tp_rank_order(monkeypatch):
    engines = [FakeEngine("g0"), FakeEngine("g1")]
    world = _run_ranks(CudaIpc(2), 4, engines, monkeypatch)
    for e, ranks in zip(engines, [(0, 1), (2, 3)]):
        assert len(e.got) == 2 and all(isinstance(p, TensorParallelPayload) for p in e.got)
        for step, p in enumerate(e.got):
            assert [x.data for x in p.per_rank] == [f"handles of rank {r}".encode() for r in ranks]
            assert p.per_rank[0].names == (f"w{step}",) and p.nbytes == 12
    assert world.barriers == [2, 2, 2, 2]  # every rank waits for the engines after each bucket


def test_colocated_tp1_unchanged_each_rank_sends_its_own_payload(monkeypatch):
    engines = [FakeEngine("g0"), FakeEngine("g1")]
    world = _run_ranks(CudaIpc(), 2, engines, monkeypatch)
    assert [[p.data for p in e.got] for e in engines] == [[b"handles of rank 0"] * 2, [b"handles of rank 1"] * 2]
    assert all(type(p) is IPCPayload for e in engines for p in e.got)
    assert world.barriers == [0, 0]  # no collective for TP 1


def test_push_weights_walks_every_bucket_through_a_gathering_transport_without_an_engine():
    class Trainer:
        def iter_weight_buckets(self, bucket_bytes, dtype):
            yield [("a", torch.ones(2))]
            yield [("b", torch.ones(3))]

    class Recorder:
        gathers = True
        sent: list = []

        def send(self, bucket, generators, worker):
            self.sent.append(([n for n, _ in bucket], list(generators)))

    w = TrainerWorker.__new__(TrainerWorker)
    w.cfg = type("C", (), {"generator": type("G", (), {"model_dtype": "bfloat16", "weight_sync_bucket_mb": 1})()})()
    w.device, w.trainer = "cpu", Trainer()
    rec = Recorder()
    stats = w.push_weights([], rec)
    assert rec.sent == [(["a"], []), (["b"], [])]
    assert (stats["weight_sync_bytes"], stats["weight_sync_buckets"]) == (20.0, 2.0)  # fp32 on CPU: 4 x 5
    rec.gathers, rec.sent = False, []
    w.push_weights([], rec)
    assert rec.sent == []  # N = 1: a rank without an engine sends nothing
