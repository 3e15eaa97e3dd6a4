"""Split placement on 2 GPUs: trainer on GPU 0, SGLang engine on GPU 1, weights broadcast over NCCL.

1. The protocol on its own: this process is the trainer (rank 0 of the weight-update group, bf16
   buckets on cuda:0); an ``SGLangGenerator`` built with ``base_gpu_id=1`` joins as rank 1. Perturbed
   weights broadcast to the engine change its greedy outputs, the original weights broadcast again
   reproduce them exactly -- for small (many) and large (one) buckets.
2. ``rlctl train`` with ``trainer.placement.colocate_all=false``: 1 FSDP2 trainer worker + 1 engine in
   their own Ray actors and GPUs, 2 steps; trainer and engine agree on the rollout log-probs.

Skipped unless 2 GPUs are visible (nvidia-h200-x2). Run: ``bash scripts/gpu_check.sh -k split``.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

torch = pytest.importorskip("torch")
if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("split placement needs 2 GPUs", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_thread(fn, *args):
    """Run ``fn(*args)`` in a thread (the engine side of a collective); returns a join() that re-raises."""
    box: dict = {}

    def run():
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            box["err"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()

    def join():
        th.join(300)
        assert not th.is_alive(), "engine side still blocked after 300 s"
        if "err" in box:
            raise box["err"]
        return box.get("out")

    return join


def test_nccl_broadcast_to_engine_on_other_gpu(model_path, prompt_ids, stop_token_ids, metrics):
    pytest.importorskip("sglang")
    from transformers import AutoModelForCausalLM

    from rlctl.generator import Sampling
    from rlctl.generator.sglang import SGLangGenerator
    from rlctl.weight_sync import FLATTENED, broadcast_bucket, bucket_metadata, init_trainer_weight_group, \
        iter_weight_buckets

    torch.cuda.set_device(0)
    greedy = Sampling(max_new_tokens=96, temperature=0.0, stop_token_ids=stop_token_ids)
    gen = SGLangGenerator(model_path, mem_fraction_static=0.3, disable_cuda_graph=True, colocated=False,
                          log_level="error", seed=0, base_gpu_id=1)
    try:
        base = gen.generate(prompt_ids, greedy).output_ids
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).cuda(0).eval()
        port = _free_port()
        join = _in_thread(gen.init_weights_update_group, "127.0.0.1", port, 1, 2, "split_test", "nccl", 120.0)
        group = init_trainer_weight_group("127.0.0.1", port, 2, "split_test", timeout_s=120)
        join()

        def push(bucket_bytes: int, load_format) -> tuple[int, int, float]:
            torch.cuda.synchronize()
            t0, nbytes, nb = time.perf_counter(), 0, 0
            for b in iter_weight_buckets(model, bucket_bytes, dtype=torch.bfloat16):
                join = _in_thread(gen.update_weights_from_distributed, *bucket_metadata(b), "split_test", load_format, 120.0)
                broadcast_bucket(b, group, load_format=load_format, timeout_s=120)
                join()
                nbytes += sum(t.numel() * t.element_size() for _, t in b)
                nb += 1
            return nbytes, nb, time.perf_counter() - t0

        res = {}
        for bucket_bytes, fmt in ((1 << 20, FLATTENED), (1 << 30, FLATTENED), (16 << 20, None)):
            # x2 then /2 is exact in bf16 (x1.5 then /1.5 is not: the first H200 run restored only 7 of 16)
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(2.0)
            push(1 << 30, FLATTENED)
            changed = sum(o != b for o, b in zip(gen.generate(prompt_ids, greedy).output_ids, base))
            with torch.no_grad():
                model.get_input_embeddings().weight.div_(2.0)
            nbytes, nb, dt = push(bucket_bytes, fmt)
            same = sum(o == b for o, b in zip(gen.generate(prompt_ids, greedy).output_ids, base))
            res[f"{bucket_bytes >> 20}MiB_{fmt or 'plain'}"] = {
                "buckets": nb, "bytes": nbytes, "s": round(dt, 3), "GBps": round(nbytes / dt / 1e9, 2),
                "changed": changed, "same": same}
        metrics["nccl_split"] = res
        for k, r in res.items():
            assert r["changed"] >= len(base) // 2, (k, r)
            assert r["same"] == len(base), (k, r)
    finally:
        gen.shutdown()


def test_two_step_split_sglang_run(sample_train, metrics):
    pytest.importorskip("sglang")
    by_step = sample_train("gpusplit", "trainer.placement.colocate_all=false",
                           "trainer.placement.policy_num_gpus_per_node=1", "generator.num_inference_engines=1",
                           "generator.weight_sync_bucket_mb=64", "trainer.eval_before_train=false",
                           "generator.gpu_memory_utilization=0.5")
    assert sorted(s for s in by_step if s > 0) == [1, 2]
    for s in (1, 2):
        r = by_step[s]
        assert r["policy/rollout_train_logprobs_abs_diff_mean"] < 0.05
        assert r["generator/weight_sync_bytes"] > 2e8  # 135M params in bf16
        assert "generator/sleep_freed_bytes" not in r  # the engine never sleeps when not colocated
    metrics["split_run"] = {k: by_step[2][k] for k in sorted(by_step[2]) if not k.startswith("data/")}
