"""GPU tests of the SGLang backend and weight sync (H200 + devkit; ``bash scripts/gpu_check.sh``).

One colocated engine (CUDA graphs off) serves the whole module; tests run in file order and share the
greedy baseline in ``STATE``:
1. the engine sleeps after build and refuses generate; a wake without a weight push refuses generate;
2. perturbed weights change greedy outputs, restored weights reproduce them exactly;
3. sleep frees the memory (and it is usable), the colocated cycle reproduces the baseline;
4. trainer/engine log-prob agreement on the engine's own tokens (< 0.05 mean abs diff);
5. weight sync from a 1-rank FSDP2 (NCCL) model: in process and from a Ray actor (as in production),
   for several bucket sizes and both IPC formats, reproducing the baseline exactly.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

GiB = 1 << 30
STATE: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]








def _greedy(sampling_cls, stop_ids, n=96):
    return sampling_cls(max_new_tokens=n, temperature=0.0, stop_token_ids=stop_ids)


def _gen_greedy(gen, prompt_ids, stop_token_ids):
    from rlctl.generator import Sampling

    return gen.generate(prompt_ids, _greedy(Sampling, stop_token_ids))


def _wake_push_wake(gen, push):
    gen.wake_up(["weights"])
    push()
    gen.wake_up(["kv_cache"])


def test_build_sleeps_and_refuses_generate(gen, prompt_ids, stop_token_ids, metrics):
    assert gen.asleep and gen.released_tags == {"weights", "kv_cache", "cuda_graph"}
    st = gen.last_stats
    metrics["engine_start_s"] = round(st["engine_start_s"], 1)
    metrics["build_occupied_GiB"] = round(st["engine_build_bytes"] / GiB, 2)
    metrics["build_sleep_freed_GiB"] = round(st["sleep_freed_bytes"] / GiB, 2)
    assert st["sleep_freed_bytes"] >= 0.5 * st["engine_build_bytes"] > 0
    with pytest.raises(RuntimeError, match="released"):
        _gen_greedy(gen, prompt_ids[:2], stop_token_ids)


def test_wake_without_push_refuses_generate(gen, hf_named, prompt_ids, stop_token_ids, metrics):
    gen.wake_up(["weights"])
    gen.wake_up(["kv_cache"])
    assert not gen.asleep
    with pytest.raises(RuntimeError, match="update_weights"):
        _gen_greedy(gen, prompt_ids[:2], stop_token_ids)
    gen.update_weights(hf_named)
    out = _gen_greedy(gen, prompt_ids, stop_token_ids)
    assert len(out.output_ids) == len(prompt_ids)
    assert all(len(i) == len(lp) > 0 for i, lp in zip(out.output_ids, out.logprobs))
    assert set(out.finish_reasons) <= {"stop", "length"}
    for ids, fr in zip(out.output_ids, out.finish_reasons):
        if fr == "stop":
            assert ids[-1] in stop_token_ids
    STATE["base"] = out.output_ids
    metrics["greedy_finish_reasons"] = {r: out.finish_reasons.count(r) for r in ("stop", "length")}
    metrics["greedy_tok_per_s"] = round(out.stats["tokens_per_s"])


def test_perturbed_weights_change_and_restore(gen, hf_named, prompt_ids, stop_token_ids, metrics):
    base = STATE["base"]
    pert = [(n, p * 1.5 if "embed_tokens" in n else p) for n, p in hf_named]
    gen.update_weights(pert)
    changed = sum(o != b for o, b in zip(_gen_greedy(gen, prompt_ids, stop_token_ids).output_ids, base))
    t = time.perf_counter()
    gen.update_weights(hf_named)
    dt = time.perf_counter() - t
    same = sum(o == b for o, b in zip(_gen_greedy(gen, prompt_ids, stop_token_ids).output_ids, base))
    nbytes = sum(p.numel() * p.element_size() for _, p in hf_named)
    metrics["perturbed_changed"] = f"{changed}/{len(base)}"
    metrics["restored_same"] = f"{same}/{len(base)}"
    metrics["update_list_GBps"] = round(nbytes / dt / 1e9, 2)
    assert changed >= len(base) // 2
    assert same == len(base)


def test_sleep_frees_memory_and_cycle_reproduces(gen, hf_named, prompt_ids, stop_token_ids, metrics):
    if gen.asleep:  # selected alone (pytest -k): wake and push as test_wake_without_push_refuses_generate does
        _wake_push_wake(gen, lambda: gen.update_weights(hf_named))
    if "base" not in STATE:
        STATE["base"] = _gen_greedy(gen, prompt_ids, stop_token_ids).output_ids
    free_awake = torch.cuda.mem_get_info()[0]
    gen.sleep()  # raises unless >= 90% of the woken memory came back
    free_asleep = torch.cuda.mem_get_info()[0]
    st = dict(gen.last_stats)
    assert st["sleep_freed_bytes"] >= 0.9 * st["sleep_expected_bytes"] > 1 * GiB
    assert free_asleep - free_awake >= 0.9 * st["sleep_expected_bytes"]
    with pytest.raises(RuntimeError, match="released"):
        _gen_greedy(gen, prompt_ids[:1], stop_token_ids)
    with pytest.raises(RuntimeError, match="weights are released"):
        gen.update_weights(hf_named)
    # the freed memory is usable by this process (the trainer)
    x = torch.empty(int(st["sleep_freed_bytes"] * 0.8), dtype=torch.uint8, device="cuda")
    x.fill_(1)
    torch.cuda.synchronize()
    del x
    torch.cuda.empty_cache()
    # colocated cycle, as the loop runs it
    gen.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="not released"):
        gen.wake_up(["weights"])
    gen.update_weights(hf_named)
    gen.wake_up(["kv_cache"])
    wake = dict(gen.last_stats)
    same = sum(o == b for o, b in zip(_gen_greedy(gen, prompt_ids, stop_token_ids).output_ids, STATE["base"]))
    metrics.update({"sleep_s": round(st["sleep_s"], 3), "sleep_freed_GiB": round(st["sleep_freed_bytes"] / GiB, 2),
                    "sleep_expected_GiB": round(st["sleep_expected_bytes"] / GiB, 2),
                    "wake_s": round(wake["wake_s"], 3), "cycle_restored_same": f"{same}/{len(STATE['base'])}"})
    assert same == len(STATE["base"])


def _trainer_logprobs(hf_model, prompt, out_ids, temperature):
    with torch.inference_mode():
        full = torch.tensor([list(prompt) + list(out_ids)], device="cuda")
        logits = hf_model(full).logits[0, len(prompt) - 1:-1].float()
        if temperature > 0:
            logits = logits / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out_ids, device="cuda")[:, None])[:, 0]
    return lp


def test_logprob_agreement(gen, hf_model, prompt_ids, stop_token_ids, metrics):
    from rlctl.generator import Sampling

    res = {}
    for temp in (1.0, 0.0):
        out = gen.generate(prompt_ids[:8], Sampling(max_new_tokens=128, temperature=temp, stop_token_ids=stop_token_ids))
        diffs = []
        for p, ids, elp in zip(prompt_ids[:8], out.output_ids, out.logprobs):
            tlp = _trainer_logprobs(hf_model, p, ids, temp)
            diffs.append((tlp - torch.tensor(elp, device="cuda")).abs().mean().item())
        res[temp] = sum(diffs) / len(diffs)
    metrics["logprob_absdiff_T1"] = round(res[1.0], 4)
    metrics["logprob_absdiff_greedy"] = round(res[0.0], 4)
    assert res[1.0] < 0.05 and res[0.0] < 0.05, res


def _fsdp2_model(model_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).cuda()
    mesh = init_device_mesh("cuda", (1,))
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def _scale_embed(model, f):
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(f)


def test_fsdp2_weight_sync_in_process(gen, model_path, prompt_ids, stop_token_ids, metrics):
    import torch.distributed as dist

    from rlctl.weight_sync import iter_weight_buckets, serialize_for_ipc

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = _fsdp2_model(model_path)
        res = {}
        for bucket_bytes, flatten in ((1024, True), (64 << 10, False), (1 << 30, True), (1 << 30, False)):
            _scale_embed(model, 2.0)  # perturbed weights first, so each sync below visibly restores
            for b in iter_weight_buckets(model, 1 << 30, dtype=torch.bfloat16):
                gen.update_weights(serialize_for_ipc(b, flatten=True))
            changed = sum(o != b for o, b in zip(_gen_greedy(gen, prompt_ids, stop_token_ids).output_ids, STATE["base"]))
            _scale_embed(model, 0.5)
            torch.cuda.synchronize()
            t = time.perf_counter()
            nbytes = nb = 0
            for b in iter_weight_buckets(model, bucket_bytes, dtype=torch.bfloat16):
                p = serialize_for_ipc(b, flatten=flatten)
                gen.update_weights(p)
                nbytes += p.nbytes
                nb += 1
            dt = time.perf_counter() - t
            same = sum(o == b for o, b in zip(_gen_greedy(gen, prompt_ids, stop_token_ids).output_ids, STATE["base"]))
            res[f"{bucket_bytes}_{'flat' if flatten else 'plain'}"] = {
                "buckets": nb, "GBps": round(nbytes / dt / 1e9, 2), "s": round(dt, 3), "changed": changed, "same": same}
        metrics["fsdp2_in_process"] = res
        for k, r in res.items():
            assert r["changed"] >= len(STATE["base"]) // 2, (k, r)
            assert r["same"] == len(STATE["base"]), (k, r)
    finally:
        dist.destroy_process_group()


class _TrainerActor:
    """A 1-rank FSDP2 trainer in its own process (a Ray actor), as in production."""

    def __init__(self, model_path: str, port: int):
        import torch as t
        import torch.distributed as dist

        t.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        self.model = _fsdp2_model(model_path)
        self.keep = []

    def payloads(self, bucket_bytes: int, flatten: bool, scale: float = 1.0):
        import time as _t

        import torch as t

        from rlctl.weight_sync import iter_weight_buckets, serialize_for_ipc

        if scale != 1.0:
            _scale_embed(self.model, scale)
        t.cuda.synchronize()
        t0 = _t.perf_counter()
        self.keep = [serialize_for_ipc(b, flatten=flatten) for b in iter_weight_buckets(self.model, bucket_bytes,
                                                                                         dtype=t.bfloat16)]
        t.cuda.synchronize()
        dt = _t.perf_counter() - t0
        if scale != 1.0:
            _scale_embed(self.model, 1.0 / scale)
        return self.keep, dt

    def release(self):
        self.keep = []
        import torch as t

        t.cuda.empty_cache()
        return True

    def info(self):
        import os as _os

        return _os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()


def test_fsdp2_weight_sync_from_ray_actor(gen, model_path, prompt_ids, stop_token_ids, metrics):
    ray = pytest.importorskip("ray")
    # the actor class lives in this test module: make it (and rlctl) importable in Ray's workers,
    # which inherit this environment
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    os.environ["PYTHONPATH"] = os.pathsep.join([root, here, os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=True)
    try:
        actor = ray.remote(num_gpus=0.5)(_TrainerActor).remote(model_path, _free_port())
        cvd, pid = ray.get(actor.info.remote(), timeout=300)
        assert pid != os.getpid()
        res = {}
        for bucket_bytes, flatten in ((1024, True), (1 << 30, True), (16 << 20, False)):
            pert, _ = ray.get(actor.payloads.remote(1 << 30, True, 2.0), timeout=120)
            gen.update_weights(pert)
            ray.get(actor.release.remote())
            changed = sum(o != b for o, b in zip(_gen_greedy(gen, prompt_ids, stop_token_ids).output_ids, STATE["base"]))
            t = time.perf_counter()
            pl, t_serialize = ray.get(actor.payloads.remote(bucket_bytes, flatten), timeout=120)
            t_recv = time.perf_counter()
            gen.update_weights(pl)  # the payloads pass through unchanged: bytes with IPC handles
            t_load = time.perf_counter()
            ray.get(actor.release.remote())
            nbytes = sum(p.nbytes for p in pl)
            same = sum(o == b for o, b in zip(_gen_greedy(gen, prompt_ids, stop_token_ids).output_ids, STATE["base"]))
            res[f"{bucket_bytes}_{'flat' if flatten else 'plain'}"] = {
                "buckets": len(pl), "MB": round(nbytes / 1e6, 1), "actor_serialize_s": round(t_serialize, 3),
                "engine_load_s": round(t_load - t_recv, 3), "end_to_end_s": round(t_load - t, 3),
                "GBps_end_to_end": round(nbytes / (t_load - t) / 1e9, 2), "changed": changed, "same": same}
        metrics["fsdp2_ray_actor"] = res
        metrics["ray_actor_cuda_visible_devices"] = cvd
        for k, r in res.items():
            assert r["changed"] >= len(STATE["base"]) // 2, (k, r)
            assert r["same"] == len(STATE["base"]), (k, r)
    finally:
        ray.shutdown()


def test_final_sleep_and_shutdown(gen, metrics):
    gen.sleep()
    metrics["final_sleep_freed_GiB"] = round(gen.last_stats["sleep_freed_bytes"] / GiB, 2)
