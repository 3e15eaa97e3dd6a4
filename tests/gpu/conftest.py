"""Fixtures for the GPU tests (H200 + devkit): model path, prompts, and a metrics file for the report.

Every test here is marked ``gpu`` and skipped without CUDA (tests/conftest.py) or without SGLang.
``RLCTL_TEST_MODEL`` picks the model folder (default: the devkit's SmolLM2-135M-Instruct);
``RLCTL_METRICS_OUT`` names a JSON file that receives the numbers the tests measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEFAULT_MODEL = "/tmp/models/smollm2-135m-instruct"
MEM_FRACTION = 0.3  # engine share of the GPU in the engine tests

QUESTIONS = [
    "What is 12 + 7?", "Name three primary colors.", "Write a haiku about the sea.", "What is the capital of France?",
    "Explain photosynthesis in one sentence.", "How many legs does a spider have?", "What is 9 times 8?",
    "Give me a synonym for happy.", "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
    "Tom has 3 apples and buys 5 more. How many apples does he have?", "Translate 'good morning' to Spanish.",
    "What is the square root of 81?", "List two planets of the solar system.", "What does a thermometer measure?",
    "A train travels 60 km in 1.5 hours. What is its speed?",
]

_METRICS: dict = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        for it in items:
            if it.get_closest_marker("gpu") is not None:
                it.add_marker(pytest.mark.skip(reason="needs CUDA (gpu test)"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("RLCTL_METRICS_OUT")
    if path and _METRICS:
        with open(path, "w") as f:
            json.dump(_METRICS, f, indent=1, default=str)


@pytest.fixture(scope="session")
def metrics() -> dict:
    """A dict the tests fill with measured numbers (written to $RLCTL_METRICS_OUT at the end)."""
    return _METRICS


@pytest.fixture(scope="session")
def model_path() -> str:
    path = os.environ.get("RLCTL_TEST_MODEL", DEFAULT_MODEL)
    if not os.path.isdir(path):
        pytest.skip(f"test model folder {path} missing (set RLCTL_TEST_MODEL; the devkit installs SmolLM2)")
    return path


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def stop_token_ids(model_path, tokenizer) -> tuple[int, ...]:
    """End-of-turn ids from the generation config (as the loop does), plus the tokenizer's eos."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    except OSError:
        pass
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end >= 0 and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False).input_ids)
    return out


@pytest.fixture(scope="module")
def gen(model_path):
    """A colocated ``SGLangGenerator`` (CUDA graphs off, 30% of the GPU), shut down after the module."""
    pytest.importorskip("sglang")
    from rlctl.generator.sglang import SGLangGenerator

    g = SGLangGenerator(model_path, mem_fraction_static=MEM_FRACTION, disable_cuda_graph=True, colocated=True,
                        log_level="error", seed=0)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def hf_model(model_path):
    """The checkpoint as a bf16 transformers model on the GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).cuda().eval()


@pytest.fixture(scope="module")
def hf_named(hf_model):
    """The checkpoint's weights as SGLang expects them (HF names, tied lm_head left out)."""
    tied = bool(getattr(hf_model.config, "tie_word_embeddings", False))
    return [(n, p.data) for n, p in hf_model.named_parameters() if not (tied and n == "lm_head.weight")]


@pytest.fixture
def sample_train(model_path, tmp_path):
    """A function running a 2-step ``rlctl train --backend sglang --preset gsm8k`` in a subprocess on the
    bundled GSM8K sample (8 prompts x 4 samples, 128 new tokens, CUDA graphs off, lr 1e-6, flexible reward
    with a format score: SmolLM2 is ~0% strict, so this gives some groups reward variance) plus the
    test's ``overrides``; writes the output to ``$OUT/<run_name>.log``, asserts exit 0 and returns the
    metrics rows by step."""
    from rlctl.gsm8k import SAMPLE_DIR

    def run(run_name: str, *overrides: str) -> dict[int, dict]:
        cmd = [sys.executable, "-m", "rlctl", "train", "--backend", "sglang", "--preset", "gsm8k",
               f"trainer.policy.model.path={model_path}",
               f"data.train_data=['{SAMPLE_DIR}/train.parquet']", f"data.val_data=['{SAMPLE_DIR}/validation.parquet']",
               "trainer.train_batch_size=8", "trainer.policy_mini_batch_size=4", "generator.n_samples_per_prompt=4",
               "trainer.micro_train_batch_size_per_gpu=8", "trainer.micro_forward_batch_size_per_gpu=16",
               "generator.sampling_params.max_new_tokens=128", "generator.eval_sampling_params.max_new_tokens=128",
               "trainer.eval_batch_size=32", "trainer.eval_interval=-1", "trainer.max_steps=2", "trainer.ckpt_interval=-1",
               "generator.sglang.disable_cuda_graph=true", f"trainer.log_path={tmp_path}/runs",
               f"trainer.ckpt_path={tmp_path}/ckpts", f"trainer.run_name={run_name}",
               "trainer.policy.optimizer_config.lr=1e-6",
               "environment.reward.method=flexible", "environment.reward.format_score=0.1", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=850,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out_dir = os.environ.get("OUT")
        if out_dir:
            Path(out_dir, f"{run_name}.log").write_text(proc.stdout + "\n---- stderr ----\n" + proc.stderr)
        assert proc.returncode == 0, proc.stderr[-4000:]
        text = (tmp_path / "runs" / "gsm8k" / run_name / "metrics.jsonl").read_text()
        return {r["step"]: r for r in (json.loads(ln) for ln in text.splitlines() if ln.strip())}

    return run
