"""Helpers shared by the benchmark scripts (tables, JSON, versions, the matmul peak, data, model sizes).

Not a benchmark itself. The scripts run as ``python benchmarks/<name>.py``, which puts this folder on
``sys.path``; nothing here imports torch, ray or sglang at import time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # rlctl from this checkout, like scripts/gpu_*.sh (PYTHONPATH=$PWD)
    sys.path.insert(0, str(REPO))

#: Where scripts/gpu_real_run.sh and benchmarks/run_all_h200.sh put the prepared full GSM8K.
DEVICE_DATA_DIR = Path("/tmp/rlctl/data/gsm8k")
#: The devkit's converted models on the H200 machine.
QWEN05 = "/tmp/models/qwen2.5-coder-0.5b-instruct"
SMOLLM2 = "/tmp/models/smollm2-135m-instruct"


# ---------------------------------------------------------------------------------------------- output
def fmt(v: Any, nd: int = 2) -> str:
    """A table cell: floats with ``nd`` decimals (thousands separated when large), None as 'n/a'."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:  # NaN
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Print a Markdown table (pastes into docs/benchmarks.md as is) and return its text."""
    rows = [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return text


def write_json(path: str | os.PathLike | None, obj: dict) -> None:
    if not path:
        return
    from rlctl.metrics import write_text_atomic  # a reader (or a killed call) never sees half a file

    p = Path(path)
    write_text_atomic(p, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    print(f"wrote {p}", flush=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def median(xs: Sequence[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else None


def log(*a: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---------------------------------------------------------------------------------------------- environment
def versions() -> dict[str, Any]:
    """Python, package and GPU versions (best effort; never imports sglang or trl if absent)."""
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(),
                           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name in ("torch", "transformers", "tokenizers", "sglang", "ray", "trl", "datasets", "accelerate",
                 "flashinfer-python", "torch-memory-saver"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        out["gpus"] = [ln.strip() for ln in q.stdout.splitlines() if ln.strip()] if q.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        out["gpus"] = []
    return out


def visible_gpus() -> int:
    """Number of GPUs torch sees (0 without CUDA). Imports torch in a child process (cheap for the caller)."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return int(r.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------------------------------------------- matmul peak
def matmul_tflops(n: int = 8192, iters: int = 50, warmup: int = 10, device: str | None = None) -> dict[str, Any]:
    """Measured dense matmul rate: ``torch.matmul`` of two random n x n matrices.

    On CUDA: bf16, ``warmup`` untimed then ``iters`` timed products between CUDA events (what the
    device README calls the H200's ~790 TFLOP/s; 50 products of 8192^3 are ~70 ms, long enough for the
    clocks to settle, where 10 were ~14 ms). On CPU (smoke tests only): float32.
    Returns ``{"tflops", "device", "dtype", "n", "iters", "seconds_per_matmul"}``.
    """
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cpu":
        n = min(n, 1024)  # smoke tests only: a CPU would take minutes for 8192^3
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    for _ in range(warmup):
        c = torch.matmul(a, b)
    if dev == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            c = torch.matmul(a, b)
        end.record()
        torch.cuda.synchronize()
        secs = start.elapsed_time(end) / 1000.0
        name = torch.cuda.get_device_name()
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            c = torch.matmul(a, b)
        secs = time.perf_counter() - t0
        name = platform.processor() or "cpu"
    del a, b, c
    per = secs / iters
    return {"tflops": 2.0 * n ** 3 / per / 1e12, "device": name, "dtype": str(dtype).replace("torch.", ""),
            "n": n, "iters": iters, "seconds_per_matmul": per}


def _child_json(call: str, tag: str, timeout: float) -> dict[str, Any]:
    """Run ``_common.<call>`` in a fresh child process of this interpreter (the caller keeps no CUDA context) and
    return the JSON it prints after ``tag``. Raises RuntimeError with the child's stderr tail when it fails."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import _common; print({tag!r} + ' ' + json.dumps(_common.{call}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    for ln in r.stdout.splitlines():
        if ln.startswith(tag + " "):
            return json.loads(ln[len(tag) + 1:])
    raise RuntimeError(f"{call.split('(')[0]} failed in a child process (rc {r.returncode}): {r.stderr[-2000:]}")


def matmul_tflops_subprocess(n: int, timeout: float = 300) -> dict[str, Any]:
    """:func:`matmul_tflops` in a fresh child process of this interpreter (the caller keeps no CUDA context)."""
    return _child_json(f"matmul_tflops(n={int(n)})", "MATMUL_JSON", timeout)


def bare_model_rates(model_path: str, seq_len: int, train_seqs: int, forward_seqs: int, repeats: int = 5) -> dict[str, Any]:
    """What the card does for this model with no rlctl around it: a plain bf16 ``AutoModelForCausalLM`` (sdpa, no
    FSDP, no padding, no compile) on random token ids, ``seq_len`` tokens per sequence.

    * ``fwd_bwd_tokens_per_s``: forward + backward of a ``[train_seqs, seq_len]`` batch (loss = mean log-prob of the
      next token, computed in chunks so the logits never exist in fp32 for the whole batch);
    * ``fwd_tokens_per_s``: a no-grad forward of ``[forward_seqs, seq_len]`` with the same log-prob head.
    Medians over ``repeats`` timed iterations after one warm-up. Returns the rates (tokens/s), the shapes and the peak
    memory (bytes). Needs CUDA."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    model.config.use_cache = False
    vocab = model.config.vocab_size
    head = model.get_output_embeddings()

    def logprob_sum(ids):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        labels = ids[:, 1:]
        total = hidden.new_zeros((), dtype=torch.float32)
        flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        for i in range(0, flat_h.shape[0], 2048):
            logits = head(flat_h[i:i + 2048]).float()
            total = total + logits.log_softmax(-1).gather(1, flat_y[i:i + 2048, None]).sum()
        return total

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return sorted(out)[len(out) // 2]

    g = torch.Generator(device=dev).manual_seed(0)
    ids_t = torch.randint(0, vocab, (train_seqs, seq_len), device=dev, generator=g)
    ids_f = torch.randint(0, vocab, (forward_seqs, seq_len), device=dev, generator=g)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        (-logprob_sum(ids_t) / ids_t.numel()).backward()

    def fwd():
        with torch.no_grad():
            logprob_sum(ids_f)

    torch.cuda.reset_peak_memory_stats()
    t_fb = timed(fwd_bwd)
    t_f = timed(fwd)
    return {"model": model_path, "seq_len": seq_len, "train_seqs": train_seqs, "forward_seqs": forward_seqs,
            "fwd_bwd_s": t_fb, "fwd_s": t_f, "fwd_bwd_tokens_per_s": train_seqs * seq_len / t_fb,
            "fwd_tokens_per_s": forward_seqs * seq_len / t_f, "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "device": torch.cuda.get_device_name()}


def bare_model_rates_subprocess(model_path: str, seq_len: int, train_seqs: int, forward_seqs: int,
                                timeout: float = 600) -> dict[str, Any]:
    """:func:`bare_model_rates` in a fresh child process (the caller keeps no CUDA context)."""
    return _child_json(f"bare_model_rates({model_path!r}, {int(seq_len)}, {int(train_seqs)}, {int(forward_seqs)})",
                       "BARE_JSON", timeout)


# ---------------------------------------------------------------------------------------------- data / model
def default_data_dir() -> Path:
    """The prepared full GSM8K on the device if present, else the 64-row sample bundled with rlctl."""
    if (DEVICE_DATA_DIR / "train.parquet").is_file():
        return DEVICE_DATA_DIR
    from rlctl.gsm8k import SAMPLE_DIR

    return Path(SAMPLE_DIR)


def parquet_rows(path: str | os.PathLike) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(str(path)).metadata.num_rows


def load_prompt_ids(model_path: str, data_dir: str | os.PathLike, n_prompts: int,
                    max_prompt_length: int = 512) -> tuple[list[list[int]], list[dict]]:
    """The first ``n_prompts`` training prompts, chat template applied exactly as ``rlctl train`` does
    (:func:`rlctl.loop.tokenize_prompts`); cycles through the file when it has fewer rows."""
    from transformers import AutoTokenizer

    from rlctl.gsm8k import read_prompts
    from rlctl.loop import tokenize_prompts

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = read_prompts([str(Path(data_dir) / "train.parquet")])[: max(n_prompts, 1) * 2]
    data = tokenize_prompts(rows, tok, max_prompt_length)
    if not data.prompt_ids:
        raise ValueError(f"no usable prompts in {data_dir}/train.parquet")
    ids = [data.prompt_ids[i % len(data.prompt_ids)] for i in range(n_prompts)]
    kept = [data.rows[i % len(data.rows)] for i in range(n_prompts)]
    return ids, kept


def model_param_counts(model_path: str) -> dict[str, int]:
    """Parameter counts of a Hugging Face causal LM folder, from its config on the meta device (no weights read).

    ``total``: unique parameters (tied embeddings counted once). ``matmul``: those that take part in
    matrix products per token, i.e. ``total`` minus the input embedding table (a lookup), plus the
    output projection when it is tied to that table. The MFU of the scripts uses ``matmul``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    matmul = total - emb.numel() + (emb.numel() if tied else 0)
    return {"total": int(total), "matmul": int(matmul), "embedding": int(emb.numel()), "tied_lm_head": bool(tied)}
