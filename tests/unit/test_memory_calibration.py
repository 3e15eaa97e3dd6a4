"""benchmarks/memory_calibration.py --probe: a trainer probe JSON turned into the memory plan's inputs and compared
with the plan's trainer peak (no GPU needed: the probe's numbers are written by hand here)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import memory_calibration as mc  # noqa: E402

from rlctl import memory_plan as mp  # noqa: E402


def _probe(tmp_path, **args):
    a = {"like": "qwen2.5-0.5b", "micro_train": 16, "micro_forward": 32, "len": 512, "grad_ckpt": False, **args}
    row = {"device": "NVIDIA H100 80GB HBM3", "args": a, "prompt_tokens": 40,
           "cycles": [{"packed": False, "peak_reserved_bytes": 28 * mp.GiB, "peak_allocated_bytes": 25 * mp.GiB},
                      {"packed": False, "peak_reserved_bytes": 30 * mp.GiB, "peak_allocated_bytes": 26 * mp.GiB},
                      {"packed": True, "peak_reserved_bytes": 99 * mp.GiB, "peak_allocated_bytes": 99 * mp.GiB}]}
    f = tmp_path / "cal.json"
    f.write_text("noise on stdout\n" + json.dumps(row) + "\n")
    return f


def test_probe_inputs_take_the_probe_settings():
    x, shape = mc.probe_inputs({"args": {"like": "qwen2.5-1.5b", "micro_train": 8, "micro_forward": 16, "len": 1024,
                                         "grad_ckpt": True}, "prompt_tokens": 40})
    assert (x["trainer.micro_train_batch_size_per_gpu"], x["trainer.micro_forward_batch_size_per_gpu"]) == (8, 16)
    assert x["trainer.max_prompt_length"] == 40 and x["generator.sampling_params.max_new_tokens"] == 1024
    assert x["trainer.gradient_checkpointing"] is True and x["trainer.algorithm.use_kl_loss"] is True
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (1536, 28, 151936)


def test_probe_row_is_the_plan_peak_without_context_against_the_padded_maxima(tmp_path):
    rows = mc.calibrate_probe(_probe(tmp_path))
    x, shape = mc.probe_inputs({"args": {"like": "qwen2.5-0.5b", "micro_train": 16, "micro_forward": 32, "len": 512},
                                "prompt_tokens": 40})
    plan = mp.plan_from_inputs(x, shape, None)
    train = next(ph for ph in plan.phases if ph.name == "train")  # the train phase is the larger one here
    want = sum(plan.item(p, k).bytes for p, k in train.parts if p == "trainer") - mp.COEFFICIENTS["cuda_context_bytes"]
    assert [r["quantity"] for r in rows] == ["trainer peak (reserved, no CUDA context)",
                                            "trainer peak (allocated, no CUDA context)"]
    assert rows[0]["run"] == "qwen2.5-0.5b micro 16/32 len 512"
    assert rows[0]["predicted"] == want and rows[0]["measured"] == 30 * mp.GiB  # the packed cycle is left out
    assert rows[1]["measured"] == 26 * mp.GiB
    assert rows[0]["rel_err"] == pytest.approx((want - 30 * mp.GiB) / (30 * mp.GiB))


def test_probe_without_a_named_shape_is_refused(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"args": {"like": None}, "cycles": []}))
    with pytest.raises(ValueError, match="probe JSON without args.like"):
        mc.calibrate_probe(f)
    f.write_text("")
    with pytest.raises(ValueError, match="not a probe JSON line"):
        mc.calibrate_probe(f)
