"""The placement plan (:func:`rlctl.job.placement.plan_placement`) and the node summary line; no Ray needed."""

from __future__ import annotations

import pytest

from rlctl.job.placement import GroupPlan, describe_nodes, plan_placement


def test_one_node_colocated_is_one_pack_group_engines_in_their_ranks_bundles():
    p = plan_placement(1, 2, 2, 1, colocated=True, gpu=True)
    assert p.groups == (GroupPlan(({"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}), "PACK", None),)
    assert p.rank_bundles == ((0, 0), (0, 1))
    assert p.engine_bundles == ((0, 0), (0, 1))


def test_one_node_split_appends_engine_bundles_to_the_same_group():
    p = plan_placement(1, 2, 3, 2, colocated=False, gpu=True)
    assert [len(g.bundles) for g in p.groups] == [5]
    assert p.groups[0].bundles[2:] == ({"CPU": 1, "GPU": 2},) * 3  # tp=2 GPUs per engine
    assert p.engine_bundles == ((0, 2), (0, 3), (0, 4))


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
