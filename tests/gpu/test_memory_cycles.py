"""GPU memory over time (issue 6, item 5): 50 colocated cycles of one SGLang engine, as the training
loop drives it -- sleep, wake weights, update_weights (from an HF bf16 model's named CUDA tensors),
wake the KV cache, a short greedy generate -- recording the free GPU memory after each release.

The first release's free memory is the baseline; the drift of a cycle is ``baseline - free`` (positive:
memory that did not come back). The test asserts the largest drift stays under 1 GiB, reports it (and
the trend) through the ``metrics`` fixture, and checks the greedy outputs stay identical every cycle.

Run (H200 + devkit): ``RLCTL_METRICS_OUT=/tmp/m.json pytest -q tests/gpu/test_memory_cycles.py``.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

GiB = 1 << 30
CYCLES = 50
MAX_DRIFT_BYTES = 1 * GiB






def _free() -> int:
    torch.cuda.synchronize()
    return int(torch.cuda.mem_get_info()[0])


def test_sleep_wake_update_cycles_do_not_leak(gen, hf_named, prompt_ids, stop_token_ids, metrics):
    from rlctl.generator import Sampling

    sampling = Sampling(max_new_tokens=16, temperature=0.0, stop_token_ids=stop_token_ids)
    prompts = prompt_ids[:4]
    gen.sleep()  # no-op if the engine is already asleep after build (colocated engines are)
    free_at_start = _free()
    frees: list[int] = []
    first_outputs = None
    t0 = time.perf_counter()
    for cycle in range(CYCLES):
        gen.wake_up(["weights"])
        gen.update_weights(hf_named)
        gen.wake_up(["kv_cache"])
        out = gen.generate(prompts, sampling)
        if first_outputs is None:
            first_outputs = out.output_ids
        assert out.output_ids == first_outputs, f"cycle {cycle}: greedy outputs changed"
        gen.sleep()  # raises if less than the expected share of the memory came back
        frees.append(_free())
    elapsed = time.perf_counter() - t0

    baseline = frees[0]
    drifts = [baseline - f for f in frees]
    max_drift = max(drifts)
    metrics.update({
        "memory_cycles": CYCLES,
        "memory_cycles_s": round(elapsed, 1),
        "memory_free_at_start_GiB": round(free_at_start / GiB, 3),
        "memory_baseline_free_GiB": round(baseline / GiB, 3),
        "memory_max_drift_MiB": round(max_drift / 2**20, 1),
        "memory_final_drift_MiB": round(drifts[-1] / 2**20, 1),
        "memory_min_drift_MiB": round(min(drifts) / 2**20, 1),
        "memory_drift_per_cycle_MiB": [round(d / 2**20, 1) for d in drifts],
    })
    assert len(frees) == CYCLES
    assert max_drift < MAX_DRIFT_BYTES, (
        f"free GPU memory after release drifted by up to {max_drift / GiB:.2f} GiB from the first release's "
        f"{baseline / GiB:.2f} GiB over {CYCLES} cycles (per cycle, MiB: {metrics['memory_drift_per_cycle_MiB']})")
