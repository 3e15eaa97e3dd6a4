"""``rlctl train --ray-address`` on a Ray cluster of two nodes (``ray.cluster_utils.Cluster``: two raylets on this
machine, 2 CPUs each, told apart by a custom resource each): ``trainer.placement.policy_num_nodes=2`` x
``policy_num_gpus_per_node=1`` puts trainer-0 + generator-0 on one node and trainer-1 + generator-1 on the other.

Shown: the run exits 0 with 2 steps in ``metrics.jsonl``; ``placement.json`` (each actor's own report of its
Ray node) matches the node of each rank's bundle, and the two nodes are the two raylets (their custom resources);
afterwards no ``rlctl-*`` actor is alive and every placement group is removed. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlctl.testing import build_tiny_llama, tiny_run_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]
REWARD = str(Path(__file__).resolve().parents[1] / "fixtures" / "test_rewards.py") + ":even_token_fraction"
NODE_RESOURCES = ("rlctl_test_node_a", "rlctl_test_node_b")


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "resources": {NODE_RESOURCES[0]: 1}, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, num_gpus=0, resources={NODE_RESOURCES[1]: 1})
        cluster.wait_for_nodes()
        yield cluster
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def test_two_nodes_one_rank_and_one_engine_each(two_nodes, tmp_path):
    import ray

    tiny = str(build_tiny_llama(tmp_path / "tiny", seed=3))
    args = tiny_run_overrides(tiny, tmp_path, "multi", 2, workers=1, reward_fn=REWARD, **{
        "trainer.placement.policy_num_nodes": 2, "generator.num_inference_engines": 2, "trainer.logger": "console", "trainer.max_ckpts_to_keep": 1,
        "ray.placement_group_timeout_s": 60})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "rlctl", "train", "--backend", "hf", "--ray-address", two_nodes.address,
                          *args], capture_output=True, text=True, env=env, timeout=240,
                         cwd=Path(__file__).resolve().parents[2])
    took = time.monotonic() - t0
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    out = " ".join((res.stdout + res.stderr).split())
    assert "placement on 2 Ray nodes:" in out, out[-3000:]
    # policy node 0 asked for the driver's node and got it (the cluster has room): no checkpoint warning
    assert "not on this driver's node" not in out

    run_dir = tmp_path / "runs" / "skyrl" / "multi"
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in rows if r["step"] >= 1] == [1, 2]

    # each actor's node, as the actor reported it, against the custom resource of that raylet
    placed = json.loads((run_dir / "placement.json").read_text())
    assert sorted(placed) == ["generator-0", "generator-1", "trainer-0", "trainer-1"]
    ray.init(address=two_nodes.address, include_dashboard=False, logging_level="WARNING")
    marker = {n["NodeID"]: next(r for r in NODE_RESOURCES if r in n["Resources"]) for n in ray.nodes() if n["Alive"]}
    node_of = {label: marker[w["node_id"]] for label, w in placed.items()}
    assert node_of["trainer-0"] == node_of["generator-0"]
    assert node_of["trainer-1"] == node_of["generator-1"]
    assert {node_of["trainer-0"], node_of["trainer-1"]} == set(NODE_RESOURCES)
    assert f"node {placed['trainer-1']['node_id'][:8]}" in out

    # nothing left behind: every rlctl actor dead, every placement group removed (actors die asynchronously)
    deadline = time.monotonic() + 30
    while True:
        alive = [a["Name"] for a in ray._private.state.actors().values()
                 if a["Name"].startswith("rlctl-") and a["State"] != "DEAD"]
        pgs = [p["state"] for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"]
        if (not alive and not pgs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (alive, pgs) == ([], [])
    # one machine is a shared filesystem: rank 0's files and the driver's COMPLETE marker meet in one folder
    ckpt = tmp_path / "ckpts" / "skyrl" / "multi"
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step_2"]  # max_ckpts_to_keep=1
    assert (ckpt / "global_step_2" / "COMPLETE").is_file()
    assert (ckpt / "global_step_2" / "policy" / "model.safetensors").is_file()
    print(f"rlctl train on 2 nodes took {took:.0f} s")
