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

Tensor-parallel engines (``generator.inference_engine_tensor_parallel_size`` = N > 1, SGLang only): an engine
spans N GPUs of ONE node and gets N per-GPU bundles, listed in TP-rank order in
:attr:`EnginePlacement.bundles` (its actor goes in the first; :func:`plan_placement` and :func:`colocated_engine_ranks` are the pure map).
Colocated, engine i covers the bundles of trainer ranks ``i*N .. i*N+N-1`` (so ``num_inference_engines x N``
must equal the trainer's GPUs, and N must divide ``policy_num_gpus_per_node`` for an engine never to span
nodes); split, each engine gets a ``STRICT_PACK`` group of N one-GPU bundles (one node). The engine actor
learns the physical GPU ids of its bundles from one probe task per bundle (:func:`bundle_gpu_ids`) and sets
``CUDA_VISIBLE_DEVICES`` to them before SGLang starts (:class:`rlctl.job.actors.GeneratorWorker`); SGLang
then runs TP rank k on visible device k (``base_gpu_id=0, gpu_id_step=1``). This is one of the two ways
SkyRL and verl use; rlctl does not use the other (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` plus
``base_gpu_id`` = the first bundle's physical id) because ``base_gpu_id + k * gpu_id_step`` assumes the
bundles' GPUs are consecutive physical ids, which Ray does not promise, and because the NOSET variable is
experimental and applies to the whole actor. A probe task holds a tiny GPU fraction only while it runs.

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
class EnginePlacement:
    """Where one engine's GPUs are.

    Attributes:
        bundles: one ``(group index, bundle index)`` per tensor-parallel rank, in TP-rank order (TP rank k
            runs on the GPU of ``bundles[k]``); the engine's actor is placed in ``bundles[0]``.
        trainer_ranks: colocated: the trainer ranks whose bundles these are, in the same order (the rank
            ``trainer_ranks[k]`` serves TP rank k's CUDA IPC handles; ``trainer_ranks[0]`` owns the engine and
            sends it the weights); split placement: ``()``.
    """

    bundles: tuple[tuple[int, int], ...]
    trainer_ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class PlacementPlan:
    """The groups and, for every actor, its ``(group index, bundle index)``.

    ``engine_bundles[i]`` is engine i's actor bundle (``engines[i].bundles[0]``); ``engines[i]`` has all of
    its GPUs (:class:`EnginePlacement`).
    """

    groups: tuple[GroupPlan, ...]
    rank_bundles: tuple[tuple[int, int], ...]
    engine_bundles: tuple[tuple[int, int], ...]
    engines: tuple[EnginePlacement, ...] = ()


def colocated_engine_ranks(engine: int, engine_tp: int, world_size: int) -> tuple[int, ...]:
    """The trainer ranks whose GPUs colocated engine ``engine`` runs on, in TP-rank order.

    Args:
        engine: the engine index i (0 .. num_inference_engines-1).
        engine_tp: ``generator.inference_engine_tensor_parallel_size`` (N).
        world_size: the trainer ranks (``policy_num_nodes x policy_num_gpus_per_node``).
    Returns:
        N = 1: ``(i % world_size,)`` (the layout rlctl always had); N > 1: ``(i*N, ..., i*N+N-1)``.
    Raises:
        ValueError: N > 1 and ``(i+1)*N > world_size`` (naming both config keys).
    """
    if engine_tp == 1:
        return (engine % world_size,)
    if (engine + 1) * engine_tp > world_size:
        raise ValueError(f"colocated engine {engine} with generator.inference_engine_tensor_parallel_size={engine_tp} "
                         f"needs trainer ranks {engine * engine_tp}..{(engine + 1) * engine_tp - 1}, but there are "
                         f"{world_size} (trainer.placement.policy_num_gpus_per_node x policy_num_nodes)")
    return tuple(range(engine * engine_tp, (engine + 1) * engine_tp))


def plan_placement(num_nodes: int, gpus_per_node: int, num_engines: int, engine_tp: int, colocated: bool,
                   gpu: bool, with_trainer: bool = True) -> PlacementPlan:
    """The placement of ``num_nodes x gpus_per_node`` trainer ranks and ``num_engines`` engines.

    Args:
        num_nodes: ``trainer.placement.policy_num_nodes``.
        gpus_per_node: ``trainer.placement.policy_num_gpus_per_node`` (ranks per node).
        num_engines: ``generator.num_inference_engines``.
        engine_tp: ``generator.inference_engine_tensor_parallel_size`` (N, GPUs of one engine).
        colocated: engines share their ranks' bundles (``trainer.placement.colocate_all``).
        gpu: bundles hold GPUs (``cuda``); else CPU only.
        with_trainer: False for ``rlctl eval``: engine bundles only.
    Returns:
        The :class:`PlacementPlan`; every bundle holds 1 CPU and 1 GPU, except that a split-placement engine
        with N = 1 keeps its single bundle of ``engine_tp`` GPUs. N > 1: colocated, engine i gets the bundles
        of ranks ``i*N .. i*N+N-1``; split (and eval), one ``STRICT_PACK`` group of N bundles per engine,
        after the trainer's groups.
    Raises:
        ValueError: ``num_nodes``, ``gpus_per_node`` or ``engine_tp`` below 1; colocated N > 1 where N does
            not divide ``gpus_per_node`` or ``num_engines x N`` differs from the trainer's GPUs (both name
            the config keys).
    """
    if num_nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"policy_num_nodes ({num_nodes}) and policy_num_gpus_per_node ({gpus_per_node}) must be >= 1")
    if engine_tp < 1:
        raise ValueError(f"generator.inference_engine_tensor_parallel_size ({engine_tp}) must be >= 1")

    def bundle(gpus: int) -> dict:
        return {"CPU": 1, **({"GPU": gpus} if gpu else {})}

    workers = num_nodes * gpus_per_node
    if colocated and with_trainer and engine_tp > 1:
        if gpus_per_node % engine_tp:
            raise ValueError(f"generator.inference_engine_tensor_parallel_size ({engine_tp}) must divide "
                             f"trainer.placement.policy_num_gpus_per_node ({gpus_per_node}): a colocated engine's "
                             "GPUs are on one node")
        if num_engines * engine_tp != workers:
            raise ValueError(f"colocated engines need generator.num_inference_engines ({num_engines}) x "
                             f"generator.inference_engine_tensor_parallel_size ({engine_tp}) to equal the trainer's "
                             f"{workers} GPUs (trainer.placement.policy_num_nodes x policy_num_gpus_per_node)")
    # N = 1: one bundle per engine (the layout rlctl always had); N > 1: a STRICT_PACK group per engine
    engine_bundles = tuple(bundle(engine_tp) for _ in range(num_engines))
    tp_groups = tuple(GroupPlan(tuple(bundle(1) for _ in range(engine_tp)), "STRICT_PACK") for _ in range(num_engines))

    def tp_engines(first_group: int) -> tuple[EnginePlacement, ...]:
        return tuple(EnginePlacement(tuple((first_group + i, k) for k in range(engine_tp))) for i in range(num_engines))

    if not with_trainer:
        if engine_tp > 1:
            engines = tp_engines(0)
            return PlacementPlan(tp_groups, (), tuple(e.bundles[0] for e in engines), engines)
        engines = tuple(EnginePlacement(((0, i),)) for i in range(num_engines))
        return PlacementPlan((GroupPlan(engine_bundles, "PACK"),), (), tuple(e.bundles[0] for e in engines), engines)
    split_tp = not colocated and engine_tp > 1
    if num_nodes == 1:
        ranks = tuple(bundle(1) for _ in range(workers))
        groups = (GroupPlan(ranks if colocated or split_tp else ranks + engine_bundles, "PACK"),)
        rank_bundles = tuple((0, r) for r in range(workers))
        split = tuple(EnginePlacement(((0, workers + i),)) for i in range(num_engines))
    else:
        groups = tuple(GroupPlan(tuple(bundle(1) for _ in range(gpus_per_node)), "STRICT_PACK", node=k)
                       for k in range(num_nodes))
        if not colocated and num_engines and not split_tp:
            groups += (GroupPlan(engine_bundles, "PACK"),)
        rank_bundles = tuple((r // gpus_per_node, r % gpus_per_node) for r in range(workers))
        split = tuple(EnginePlacement(((num_nodes, i),)) for i in range(num_engines))
    if colocated:
        engines = []
        for i in range(num_engines):
            ranks_i = colocated_engine_ranks(i, engine_tp, workers)
            engines.append(EnginePlacement(tuple(rank_bundles[r] for r in ranks_i), ranks_i))
        engines = tuple(engines)
    elif split_tp:
        engines = tp_engines(len(groups))
        groups += tp_groups
    else:
        engines = split
    return PlacementPlan(groups, rank_bundles, tuple(e.bundles[0] for e in engines), engines)


def bundle_gpu_ids(pgs: list, bundles: tuple[tuple[int, int], ...]) -> list[str]:
    """The physical GPU id (as Ray assigns it, e.g. ``"3"``) of each bundle, in ``bundles`` order: one probe
    task per bundle, holding 1/100 GPU and no CPU while it runs ``ray.get_gpu_ids()``. Needs ``ray.init``.

    Args:
        pgs: the placement groups of :func:`reserve`.
        bundles: ``(group index, bundle index)`` pairs (an engine's :attr:`EnginePlacement.bundles`).
    Returns:
        One id string per bundle; they are valid ``CUDA_VISIBLE_DEVICES`` entries on that bundle's node.
    Raises:
        RuntimeError: a bundle reports no GPU or several (it was not a one-GPU bundle).
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=0.01)
    def probe() -> list:
        return [str(x) for x in ray.get_gpu_ids()]

    refs = [probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pgs[g], placement_group_bundle_index=b)).remote() for g, b in bundles]
    out = []
    for (g, b), ids in zip(bundles, ray.get(refs)):
        if len(ids) != 1:
            raise RuntimeError(f"bundle {b} of placement group {g} reports GPU ids {ids}, expected one")
        out.append(ids[0])
    return out


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
                raise PlacementTimeout(_timeout_message(plan, k, timeout_s, ray.cluster_resources())) from None
            if g.node is not None:
                nodes.append(placement_group_table(pg)["bundles_to_node_id"][0])
    except BaseException:
        for pg in pgs:
            remove_placement_group(pg)
        raise
    return pgs


class PlacementTimeout(RuntimeError):
    """Ray could not reserve the job's placement groups within ``ray.placement_group_timeout_s`` (the message
    names the bundles, the cluster's resources and the keys to change); the CLI prints it without a traceback."""


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
