"""The placement plan (:func:`rlctl.job.placement.plan_placement`) and the node summary line; no Ray needed."""

from __future__ import annotations

import pytest

from rlctl.job.placement import EnginePlacement, GroupPlan, colocated_engine_ranks, describe_nodes, plan_placement


def test_one_node_colocated_is_one_pack_group_engines_in_their_ranks_bundles():
    p = plan_placement(1, 2, 2, 1, colocated=True, gpu=True)
    assert p.groups == (GroupPlan(({"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}), "PACK", None),)
    assert p.rank_bundles == ((0, 0), (0, 1))
    assert p.engine_bundles == ((0, 0), (0, 1))


def test_one_node_split_appends_engine_bundles_to_the_same_group():
    p = plan_placement(1, 2, 3, 1, colocated=False, gpu=True)
    assert p.groups == (GroupPlan(({"CPU": 1, "GPU": 1},) * 5, "PACK"),)
    assert p.engine_bundles == ((0, 2), (0, 3), (0, 4))
    assert [e.bundles for e in p.engines] == [((0, 2),), ((0, 3),), ((0, 4),)]


def test_two_nodes_colocated_one_strict_pack_group_per_node():
    p = plan_placement(2, 2, 4, 1, colocated=True, gpu=True)
    assert [(g.strategy, g.node, len(g.bundles)) for g in p.groups] == [("STRICT_PACK", 0, 2), ("STRICT_PACK", 1, 2)]
    # rank r on node r // 2; engine i shares rank i's bundle
    assert p.rank_bundles == ((0, 0), (0, 1), (1, 0), (1, 1))
    assert p.engine_bundles == p.rank_bundles


def test_three_nodes_split_engines_get_a_pack_group_of_their_own_on_cpu():
    p = plan_placement(3, 1, 2, 1, colocated=False, gpu=False)
    assert [(g.strategy, g.node, g.bundles) for g in p.groups] == [
        ("STRICT_PACK", 0, ({"CPU": 1},)), ("STRICT_PACK", 1, ({"CPU": 1},)), ("STRICT_PACK", 2, ({"CPU": 1},)),
        ("PACK", None, ({"CPU": 1},) * 2)]
    assert p.rank_bundles == ((0, 0), (1, 0), (2, 0))
    assert p.engine_bundles == ((3, 0), (3, 1))


def test_eval_reserves_engines_only_whatever_the_node_count():
    p = plan_placement(4, 8, 2, 1, colocated=False, gpu=True, with_trainer=False)
    assert p.groups == (GroupPlan(({"CPU": 1, "GPU": 1},) * 2, "PACK"),)
    assert (p.rank_bundles, p.engine_bundles) == ((), ((0, 0), (0, 1)))


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match=r"policy_num_nodes \(0\) and policy_num_gpus_per_node \(2\) must be >= 1"):
        plan_placement(0, 2, 2, 1, colocated=True, gpu=False)


def test_describe_nodes_groups_actors_by_node_in_order():
    a = {"node_id": "aaaaaaaa11", "ip": "10.0.0.1"}
    b = {"node_id": "bbbbbbbb22", "ip": "10.0.0.2"}
    line = describe_nodes({"trainer-0": a, "trainer-1": b, "generator-0": a, "generator-1": b})
    assert line == "node aaaaaaaa (10.0.0.1): trainer-0, generator-0; node bbbbbbbb (10.0.0.2): trainer-1, generator-1"


# ------------------------------------------------------------------ tensor-parallel engines (TP = N > 1)

GPU1 = {"CPU": 1, "GPU": 1}


def test_colocated_4_gpus_tp2_engine_i_covers_ranks_2i_and_2i_plus_1():
    p = plan_placement(1, 4, 2, 2, colocated=True, gpu=True)
    assert p.groups == (GroupPlan((GPU1,) * 4, "PACK"),)
    assert p.engines == (EnginePlacement(((0, 0), (0, 1)), (0, 1)), EnginePlacement(((0, 2), (0, 3)), (2, 3)))
    assert p.engine_bundles == ((0, 0), (0, 2))  # each engine's actor sits with its first rank


def test_colocated_8_gpus_tp4():
    p = plan_placement(1, 8, 2, 4, colocated=True, gpu=True)
    assert p.engines == (EnginePlacement(((0, 0), (0, 1), (0, 2), (0, 3)), (0, 1, 2, 3)),
                         EnginePlacement(((0, 4), (0, 5), (0, 6), (0, 7)), (4, 5, 6, 7)))


def test_colocated_two_nodes_of_4_tp2_engines_never_span_nodes():
    p = plan_placement(2, 4, 4, 2, colocated=True, gpu=True)
    assert [(g.strategy, g.node, len(g.bundles)) for g in p.groups] == [("STRICT_PACK", 0, 4), ("STRICT_PACK", 1, 4)]
    assert p.engines == (EnginePlacement(((0, 0), (0, 1)), (0, 1)), EnginePlacement(((0, 2), (0, 3)), (2, 3)),
                         EnginePlacement(((1, 0), (1, 1)), (4, 5)), EnginePlacement(((1, 2), (1, 3)), (6, 7)))


def test_split_tp2_one_strict_pack_group_of_per_gpu_bundles_per_engine():
    p = plan_placement(1, 2, 2, 2, colocated=False, gpu=True)
    assert p.groups == (GroupPlan((GPU1,) * 2, "PACK"), GroupPlan((GPU1,) * 2, "STRICT_PACK"),
                        GroupPlan((GPU1,) * 2, "STRICT_PACK"))
    assert p.engines == (EnginePlacement(((1, 0), (1, 1))), EnginePlacement(((2, 0), (2, 1))))
    assert p.engine_bundles == ((1, 0), (2, 0))
    p = plan_placement(2, 4, 1, 4, colocated=False, gpu=True)  # two policy nodes, then the engine's group
    assert [(g.strategy, g.node, len(g.bundles)) for g in p.groups] == [
        ("STRICT_PACK", 0, 4), ("STRICT_PACK", 1, 4), ("STRICT_PACK", None, 4)]
    assert p.engines == (EnginePlacement(((2, 0), (2, 1), (2, 2), (2, 3))),)
    p = plan_placement(1, 8, 2, 2, colocated=False, gpu=True, with_trainer=False)  # eval: engines only
    assert p.groups == (GroupPlan((GPU1,) * 2, "STRICT_PACK"),) * 2 and p.rank_bundles == ()
    assert p.engines == (EnginePlacement(((0, 0), (0, 1))), EnginePlacement(((1, 0), (1, 1))))


def test_colocated_tp_must_divide_a_node_and_cover_the_trainer_gpus():
    with pytest.raises(ValueError, match=r"generator.inference_engine_tensor_parallel_size \(4\) must divide "
                                         r"trainer.placement.policy_num_gpus_per_node \(6\)"):
        plan_placement(2, 6, 3, 4, colocated=True, gpu=True)
    with pytest.raises(ValueError, match=r"generator.num_inference_engines \(1\) x "
                                         r"generator.inference_engine_tensor_parallel_size \(2\) to equal the "
                                         r"trainer's 4 GPUs"):
        plan_placement(1, 4, 1, 2, colocated=True, gpu=True)


def test_colocated_engine_ranks():
    assert colocated_engine_ranks(3, 1, 2) == (1,)  # N = 1: engine i with rank i % world_size, as always
    assert colocated_engine_ranks(1, 4, 8) == (4, 5, 6, 7)
    with pytest.raises(ValueError, match="colocated engine 2 with generator.inference_engine_tensor_parallel_size=2 "
                                         "needs trainer ranks 4..5, but there are 4"):
        colocated_engine_ranks(2, 2, 4)
