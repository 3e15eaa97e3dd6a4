"""Weight transports: chosen in one place, and which engines each trainer rank serves."""

from rlctl.job.transport import Broadcast, CudaIpc, ObjectStore, choose_transport


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
