"""Where the actors of a job go: the placement plan (pure, :func:`plan_placement`) and its reservation as Ray
placement groups (:func:`reserve`).

One node (``trainer.placement.policy_num_nodes=1``, and ``rlctl eval``): one ``PACK`` group, one bundle per
policy rank, then (split placement) one bundle per engine -- the layout rlctl always had.

Several nodes (``policy_num_nodes=N>1``): one ``STRICT_PACK`` group per node with
``policy_num_gpus_per_node`` (g) bundles, so rank r's bundle is on node ``r // g``. The groups are reserved one
after the other; group k's bundles carry the label selector ``ray.io/node-id: !in(<nodes of groups 0..k-1>)``,
so every group gets a node of its own (Ray >= 2.49 label selectors). Group 0 asks for the driver's node
(``_soft_target_node_id``, a hint: Ray may place it elsewhere when that node is full), so that rank 0 -- which
writes the checkpoints -- shares the driver's filesystem when it can. Colocated engines sit in their rank's
bundle (engine i with rank ``i % world_size``, the rank that sends it weights); split-placement engines get a
``PACK`` group of their own, wherever Ray finds room. Placement of several nodes is SkyRL/verl's idea of
per-node bundles, written for rlctl.

Test: ``pytest tests/unit/test_placement.py`` (the plan), ``tests/unit/test_multinode.py`` (two Ray nodes),
``tests/unit/test_train_e2e.py`` (one node).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

NODE_ID_LABEL = "ray.io/node-id"


@dataclass(frozen=True)
class GroupPlan:
    """One placement group to reserve.

    Attributes:
        bundles: the bundles' resources (``{"CPU": 1, "GPU": 1}``; GPU absent on the CPU).
        strategy: ``PACK`` or ``STRICT_PACK``.
        node: for a policy node's group, its index k (0 .. policy_num_nodes-1): the group must get a node no
            other policy node's group has; None: anywhere.
    """

    bundles: tuple[dict, ...]
    strategy: str
    node: int | None = None


@dataclass(frozen=True)
class PlacementPlan:
    """The groups and, for every actor, its ``(group index, bundle index)``."""

    groups: tuple[GroupPlan, ...]
    rank_bundles: tuple[tuple[int, int], ...]
    engine_bundles: tuple[tuple[int, int], ...]


def plan_placement(num_nodes: int, gpus_per_node: int, num_engines: int, engine_tp: int, colocated: bool,
                   gpu: bool, with_trainer: bool = True) -> PlacementPlan:
    """The placement of ``num_nodes x gpus_per_node`` trainer ranks and ``num_engines`` engines.

    Args:
        num_nodes: ``trainer.placement.policy_num_nodes``.
        gpus_per_node: ``trainer.placement.policy_num_gpus_per_node`` (ranks per node).
        num_engines: ``generator.num_inference_engines``.
        engine_tp: ``generator.inference_engine_tensor_parallel_size`` (GPUs of a split-placement engine).
        colocated: engines share their rank's bundle (``trainer.placement.colocate_all``).
        gpu: bundles hold GPUs (``cuda``); else CPU only.
        with_trainer: False for ``rlctl eval``: engine bundles only, one ``PACK`` group.
    Returns:
        The :class:`PlacementPlan`; every bundle holds 1 CPU, and 1 GPU per rank or ``engine_tp`` per engine.
    Raises:
        ValueError: ``num_nodes`` or ``gpus_per_node`` below 1, or colocated engines without trainer ranks.
    """
    if num_nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"policy_num_nodes ({num_nodes}) and policy_num_gpus_per_node ({gpus_per_node}) must be >= 1")

    def bundle(gpus: int) -> dict:
        return {"CPU": 1, **({"GPU": gpus} if gpu else {})}

    engine_bundles = tuple(bundle(engine_tp) for _ in range(num_engines))
    if not with_trainer:
        return PlacementPlan((GroupPlan(engine_bundles, "PACK"),), (), tuple((0, i) for i in range(num_engines)))
    workers = num_nodes * gpus_per_node
    if num_nodes == 1:
        ranks = tuple(bundle(1) for _ in range(workers))
        groups = (GroupPlan(ranks if colocated else ranks + engine_bundles, "PACK"),)
        rank_bundles = tuple((0, r) for r in range(workers))
        split = tuple((0, workers + i) for i in range(num_engines))
    else:
        groups = tuple(GroupPlan(tuple(bundle(1) for _ in range(gpus_per_node)), "STRICT_PACK", node=k)
                       for k in range(num_nodes))
        if not colocated and num_engines:
            groups += (GroupPlan(engine_bundles, "PACK"),)
        rank_bundles = tuple((r // gpus_per_node, r % gpus_per_node) for r in range(workers))
        split = tuple((num_nodes, i) for i in range(num_engines))
    engines = tuple(rank_bundles[i % workers] for i in range(num_engines)) if colocated else split
    return PlacementPlan(groups, rank_bundles, engines)


def reserve(plan: PlacementPlan, timeout_s: float) -> list:
    """Reserve ``plan``'s placement groups (in order; each policy node's group on a node of its own) and wait
    until all are ready, ``timeout_s`` seconds in all. Needs ``ray.init`` first.

    Returns:
        The ``ray.util.placement_group.PlacementGroup`` objects, in ``plan.groups`` order.
    Raises:
        RuntimeError: not ready within ``timeout_s`` (every group reserved so far is removed first: a pending
            group would grab the resources once they free up); or a plan of several policy nodes on a Ray
            without placement-group label selectors (before 2.49).
    """
    import inspect

    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    multi = any(g.node is not None for g in plan.groups)  # only a plan of several policy nodes sets it
    if multi and "bundle_label_selector" not in inspect.signature(placement_group).parameters:
        raise RuntimeError(f"trainer.placement.policy_num_nodes > 1 needs Ray >= 2.49 (placement-group label "
                           f"selectors); this is Ray {ray.__version__}")
    deadline = time.monotonic() + timeout_s
    pgs: list = []
    nodes: list[str] = []  # the node id (hex) of each policy node's group, in node order
    try:
        for k, g in enumerate(plan.groups):
            kwargs: dict = {}
            if g.node is not None:
                if nodes:
                    kwargs["bundle_label_selector"] = [{NODE_ID_LABEL: f"!in({','.join(nodes)})"}] * len(g.bundles)
                else:
                    kwargs["_soft_target_node_id"] = ray.get_runtime_context().get_node_id()
            pg = placement_group(list(g.bundles), strategy=g.strategy, **kwargs)
            pgs.append(pg)
            try:
                ray.get(pg.ready(), timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(_timeout_message(plan, k, timeout_s, ray.cluster_resources())) from None
            if g.node is not None:
                nodes.append(placement_group_table(pg)["bundles_to_node_id"][0])
    except BaseException:
        for pg in pgs:
            remove_placement_group(pg)
        raise
    return pgs


def _timeout_message(plan: PlacementPlan, k: int, timeout_s: float, cluster: dict) -> str:
    g = plan.groups[k]
    total = sum(len(x.bundles) for x in plan.groups)
    if g.node is not None:
        nodes = sum(1 for x in plan.groups if x.node is not None)
        what = (f"policy node {g.node}: {len(g.bundles)} bundles {g.bundles[0]} on one node that no other "
                f"policy node uses (trainer.placement.policy_num_nodes={nodes} needs {nodes} such nodes)")
    else:
        what = f"{total} bundles {plan.groups[0].bundles[0]}"
    return (f"Ray could not reserve {what} within {timeout_s} s (cluster has {cluster}). Lower "
            "trainer.placement.policy_num_gpus_per_node / trainer.placement.policy_num_nodes / "
            "generator.num_inference_engines, set ray.num_cpus / ray.num_gpus, or raise ray.placement_group_timeout_s")


def describe_nodes(actor_nodes: dict[str, dict[str, str]]) -> str:
    """One line saying which actors share which Ray node, nodes in order of first appearance.

    Args:
        actor_nodes: actor label (``trainer-0``, ``generator-1``) -> ``{"node_id": <hex>, "ip": <IP>}``.
    Returns:
        e.g. ``"node 10bd4822 (10.0.0.1): trainer-0, generator-0; node 8095d650 (10.0.0.2): trainer-1, generator-1"``
        (node ids cut to 8 hex digits).
    """
    by_node: dict[tuple[str, str], list[str]] = {}
    for label, where in actor_nodes.items():
        by_node.setdefault((where["node_id"], where["ip"]), []).append(label)
    return "; ".join(f"node {nid[:8]} ({ip}): {', '.join(labels)}" for (nid, ip), labels in by_node.items())
