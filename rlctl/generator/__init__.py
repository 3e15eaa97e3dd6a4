"""The generator interface every rollout backend implements, and lazy loading of backends by name.

A generator turns prompt token ids into response token ids with per-token log-probabilities. The
training loop only sees this interface, so the transformers backend (``hf``, runs on CPU in CI) and
the SGLang backend (``sglang``, the GPU product) are interchangeable. Backends are imported lazily by
name (``load_generator("hf", ...)``), so importing this module never imports torch or sglang.

Colocation protocol (what the loop calls, in order, every step)::

    wake_up(["weights"]); update_weights(...); wake_up(["kv_cache"]); generate(...); sleep()

A backend refuses ``generate`` after ``wake_up(["weights"])`` until ``update_weights`` has been
called, because woken weights may be garbage (SGLang discards released weights).

Test: ``pytest tests/unit/test_generator_hf.py``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

# Tags accepted by wake_up(); the names are SGLang's memory-occupation tags.
WAKE_TAGS = ("weights", "kv_cache", "cuda_graph")

BACKENDS = {
    "hf": "rlctl.generator.hf:HFGenerator",
    "sglang": "rlctl.generator.sglang:SGLangGenerator",
}


def derive_seed(*keys: int) -> int:
    """A 31-bit seed derived from ``keys`` (e.g. ``(base, step, generation)``, ``(step_seed, engine)``,
    ``(engine_seed, request)``) by ``numpy.random.SeedSequence``: distinct key tuples give independent seeds, so
    request j+1 of step s no longer shares a seed with request j of step s+1 (as ``seed + i`` arithmetic did).
    Deterministic across runs and machines. Raises ValueError for a negative key."""
    import numpy as np

    if any(int(k) < 0 for k in keys):
        raise ValueError(f"derive_seed: keys must be >= 0, got {keys}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint32)[0] >> 1)


@dataclass(frozen=True)
class Sampling:
    """Per-call sampling parameters, backend neutral (SGLang names).

    ``temperature == 0`` means greedy. ``top_k == -1`` means no top-k cut. ``max_new_tokens`` is
    always explicit (SGLang's own default of 128 silently truncates). ``stop_token_ids`` end a
    response (the end-of-turn token of chat models); the stop token is kept in ``output_ids``.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass
class GenerationOutput:
    """Result of :meth:`Generator.generate` for B prompts (one response per prompt).

    - ``output_ids``: B lists of response token ids (stop token included when generation stopped).
    - ``logprobs``: B lists of floats, same lengths as ``output_ids``; the log-probability of each
      sampled token under the temperature-scaled distribution (logits / temperature), as SGLang
      returns them. For greedy (temperature 0) the unscaled distribution.
    - ``finish_reasons``: B strings, ``"stop"`` (stop token or EOS) or ``"length"`` (hit
      ``max_new_tokens``).
    """

    output_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    stats: dict[str, float] = field(default_factory=dict)


class Generator(Protocol):
    """The interface of a rollout backend. Implementations live in ``rlctl/generator/<name>.py``."""

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: Sampling) -> GenerationOutput:
        """Generate one response per prompt (B prompts in, B responses out)."""

    def sleep(self) -> None:
        """Release the backend's memory (weights and KV cache) so the trainer can use it."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-acquire memory for ``tags`` (subset of :data:`WAKE_TAGS`; None = all)."""

    def update_weights(self, named_tensors: Any) -> None:
        """Load new policy weights: a list of ``(hf_parameter_name, tensor)`` (or a backend payload)."""

    def shutdown(self) -> None:
        """Free every resource; the generator is unusable afterwards."""


def load_generator(backend: str, **kwargs: Any) -> Generator:
    """Import backend ``backend`` lazily and build it with ``kwargs``.

    Raises:
        ValueError: unknown backend name (the message lists the known ones).
        ImportError: the backend's package is missing (e.g. ``pip install 'rlctl[sglang]'``).
    """
    try:
        target = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown generator backend {backend!r}; known: {', '.join(sorted(BACKENDS))}") from None
    module_name, cls_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)(**kwargs)
