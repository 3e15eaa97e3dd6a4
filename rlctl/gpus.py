"""The local NVIDIA GPUs, read without importing torch: one ``nvidia-smi`` query (index, UUID, memory) with a short
timeout, and the subset a CUDA process started here would see under ``CUDA_VISIBLE_DEVICES``.

Both the environment preflight (:mod:`rlctl.preflight`: how many GPUs) and the memory plan
(:mod:`rlctl.memory_plan`: how large the smallest visible GPU is) read this one list, so ``rlctl train`` runs
``nvidia-smi`` once and the plan never checks a GPU that ``CUDA_VISIBLE_DEVICES`` hides.

Test: ``pytest tests/unit/test_preflight.py tests/unit/test_memory_plan.py -k gpu`` (a fake ``nvidia-smi`` on ``PATH``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

NVIDIA_SMI_TIMEOUT_S = 3.0
MiB = 1 << 20
QUERY = ["--query-gpu=index,uuid,memory.total,name", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class Gpu:
    """One GPU as ``nvidia-smi`` lists it: its index, UUID (``GPU-...``), total memory in bytes and product name
    (e.g. ``NVIDIA H100 80GB HBM3``; empty when ``nvidia-smi`` printed none)."""

    index: int
    uuid: str
    memory_bytes: int
    name: str = ""


def query(timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> list[Gpu] | None:
    """All GPUs of this machine (container), from ``nvidia-smi --query-gpu=index,uuid,memory.total,name`` (memory in
    MiB). ``timeout_s``: seconds ``nvidia-smi`` may take.

    Returns:
        The GPUs in index order; ``None`` when ``nvidia-smi`` is absent, fails, hangs past ``timeout_s`` or prints
        no GPU line (lines that do not parse are skipped).
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, *QUERY], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    gpus = []
    for line in res.stdout.splitlines():
        parts = [p.strip() for p in line.split(",", 3)]  # the name comes last: whatever it holds stays one field
        if len(parts) < 3:
            continue
        try:
            gpus.append(Gpu(int(parts[0]), parts[1], int(float(parts[2])) * MiB, parts[3] if len(parts) > 3 else ""))
        except ValueError:
            continue
    return gpus or None


def visible(gpus: list[Gpu], cuda_visible_devices: str | None) -> list[Gpu] | None:
    """The GPUs a CUDA process sees under ``CUDA_VISIBLE_DEVICES`` (None: all), in that variable's order.

    Entries are indices or UUID prefixes (``GPU-8a1...``); like CUDA, the list stops at the first entry that names no
    GPU (an index past the last GPU, an unknown UUID, ``-1``) or repeats one, and an empty value hides every GPU.

    Returns:
        The visible GPUs; ``None`` when an entry is a MIG instance (``MIG-...``), which this list of whole GPUs cannot
        map: the caller then counts the variable's entries instead.
    """
    if cuda_visible_devices is None:
        return list(gpus)
    by_index = {g.index: g for g in gpus}
    out: list[Gpu] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not entry or re.fullmatch(r"-\d+", entry):
            break
        if re.fullmatch(r"\d+", entry):
            g = by_index.get(int(entry))
        else:
            if entry.upper().startswith("MIG-"):
                return None  # a MIG instance: nvidia-smi --query-gpu lists only whole GPUs
            g = next((x for x in gpus if x.uuid.startswith(entry)), None)
        if g is None or g in out:
            break
        out.append(g)
    return out
