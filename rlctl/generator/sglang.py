"""SGLang rollout backend: an in-process ``sglang.Engine`` (token in, token out) that sleeps between rollouts.

The engine runs its scheduler in a child process on the same GPU as the caller; with ``tp_size`` N > 1, N
schedulers on the caller's visible GPUs 0..N-1 (the Ray actor sets ``CUDA_VISIBLE_DEVICES`` to its engine's
GPUs, :class:`rlctl.job.actors.GeneratorWorker`), fed per TP rank by a
:class:`rlctl.weight_sync.TensorParallelPayload` when colocated. The sleep check measures visible GPU 0 only. ``sglang`` is
imported here only, inside :class:`SGLangGenerator`'s constructor, so importing this module is cheap
and works without SGLang.

Colocation (``colocated=True``): the engine releases all its GPU memory right after it is built
(weights and KV cache are only re-acquired by :meth:`wake_up`), so the trainer can load next to it.
Each step the loop calls ``wake_up(["weights"])``, ``update_weights(...)`` (once per bucket),
``wake_up(["kv_cache"])``, ``generate(...)``, ``sleep()``. The wrapper enforces that order:

* ``generate`` is refused while any memory tag is released, and after waking ``weights`` until
  ``update_weights`` was called (SGLang discards released weights: they would be garbage);
* waking a tag that is not released is refused (SGLang's scheduler would fail on it);
* ``update_weights`` is refused while ``weights`` is released;
* ``sleep`` checks with ``torch.cuda.mem_get_info`` that free GPU memory grew by at least
  :attr:`SGLangGenerator.MIN_FREED_FRACTION` of what the awake engine occupied (measured around the
  wake-ups), polling briefly, and raises ``RuntimeError`` otherwise, instead of a later OOM.

Timings and byte counts of the last sleep / wake / update / generate are in :attr:`last_stats`.

Measured on the H200 (SmolLM2-135M, ``mem_fraction_static=0.3``, no CUDA graphs; tests/gpu): engine
start 38.5 s; the FIRST generate after start took about 75 s more (Triton kernel JIT), later ones are
fast, so budget a warm-up; sleep 0.02 s freeing 41.7 of 41.6 GiB woken; wake 0.013 s; weight push of
269 MB from a Ray actor in one flattened bucket 0.075 s end to end (3.6 GB/s), 1 KB buckets 0.68 s.

Test: ``pytest -m gpu tests/gpu/test_sglang_engine.py`` (H200, devkit installed).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Sequence

from rlctl.generator import WAKE_TAGS, GenerationOutput, Sampling, derive_seed

log = logging.getLogger(__name__)

# vLLM / other-framework option names that SGLang does not know, with what to write instead.
_FOREIGN_OPTIONS = {
    "gpu_memory_utilization": "mem_fraction_static",
    "tensor_parallel_size": "tp_size",
    "enforce_eager": "disable_cuda_graph",
    "enable_prefix_caching": "disable_radix_cache (inverted)",
    "max_num_seqs": "max_running_requests",
    "enable_sleep_mode": "enable_memory_saver",
    "seed": "seed (a constructor argument, not an engine kwarg)",
    "cuda_graph_max_bs": "cuda_graph_max_bs_decode",
    "min_tokens": "(not supported with skip_tokenizer_init)",
    "max_generate_length": "Sampling.max_new_tokens",
    "include_stop_str_in_output": "(stop tokens are always kept in output_ids)",
    "async_engine": "(not an SGLang option)",
}

_FINISH = {"stop": "stop", "length": "length"}
GiB = 1 << 30


def _free_bytes() -> int:
    import torch

    return int(torch.cuda.mem_get_info()[0])


class SGLangGenerator:
    """Rollout backend on an in-process ``sglang.Engine`` (see the module doc for the protocol)."""

    #: ``sleep`` raises unless free memory grew by this fraction of what the awake engine occupied.
    MIN_FREED_FRACTION = 0.9
    #: For the sleep right after the build, the occupancy includes per-process overhead that is
    #: never released (CUDA context, allocator cache); below this fraction it is an error, between
    #: it and MIN_FREED_FRACTION a warning.
    MIN_FREED_FRACTION_AT_BUILD = 0.5
    #: How long ``sleep`` polls free memory before concluding the release did not happen.
    RELEASE_POLL_S = 3.0

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bfloat16",
        mem_fraction_static: float = 0.8,
        attention_backend: str = "triton",
        sampling_backend: str = "pytorch",
        disable_cuda_graph: bool = False,
        cuda_graph_max_bs_decode: int | None = None,
        disable_radix_cache: bool = False,
        max_running_requests: int | None = None,
        enable_memory_saver: bool = True,
        sleep_on_idle: bool = False,
        log_level: str = "error",
        seed: int = 0,
        tp_size: int = 1,
        colocated: bool = True,
        **engine_kwargs: Any,
    ) -> None:
        for k in engine_kwargs:
            if k in _FOREIGN_OPTIONS:
                raise ValueError(f"SGLang engine option {k!r} does not exist; use {_FOREIGN_OPTIONS[k]}")
        if colocated and not enable_memory_saver:
            raise ValueError("colocated=True needs enable_memory_saver=True (sleep/wake releases GPU memory)")
        if not 0.0 < mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {mem_fraction_static}")
        try:
            import sglang
        except ImportError as e:
            raise ImportError("the sglang backend needs SGLang 0.5.17: pip install 'rlctl[sglang]' "
                              "(on the offline H200: the devkit, source /tmp/dk/env.sh)") from e
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("the sglang backend needs a CUDA GPU")

        self.model_path = model_path
        self.tp_size = tp_size
        self.colocated = colocated
        self.last_stats: dict[str, float] = {}
        self._keeps_weights = bool(engine_kwargs.get("enable_weights_cpu_backup", False))
        self._released: set[str] = set()
        self._weights_pushed = True  # the engine loads model_path at build
        self._resident_bytes = 0  # engine memory acquired since the last sleep (for the sleep check)
        self._at_build = True
        self._new_cycle = True
        self._engine = None

        kwargs: dict[str, Any] = dict(
            model_path=model_path, dtype=dtype, mem_fraction_static=mem_fraction_static,
            attention_backend=attention_backend, sampling_backend=sampling_backend,
            disable_cuda_graph=disable_cuda_graph, disable_radix_cache=disable_radix_cache,
            enable_memory_saver=enable_memory_saver, sleep_on_idle=sleep_on_idle, log_level=log_level,
            random_seed=seed, tp_size=tp_size, skip_tokenizer_init=True,
        )
        if cuda_graph_max_bs_decode is not None:
            kwargs["cuda_graph_max_bs_decode"] = cuda_graph_max_bs_decode
        if max_running_requests is not None:
            kwargs["max_running_requests"] = max_running_requests
        kwargs.update(engine_kwargs)

        # torch_memory_saver refuses expandable segments in the engine's process: the scheduler is
        # spawned with this process's environment, so hide the setting while it starts.
        alloc_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        hide = enable_memory_saver and alloc_conf is not None and "expandable_segments:True" in alloc_conf
        _free_bytes()  # create this process's CUDA context before measuring
        free0 = _free_bytes()
        t0 = time.perf_counter()
        try:
            if hide:
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(
                    p for p in alloc_conf.split(",") if not p.startswith("expandable_segments"))
            self._engine = sglang.Engine(**kwargs)
        finally:
            if hide:
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
        start_s = time.perf_counter() - t0
        free1 = _free_bytes()
        self._resident_bytes = max(0, free0 - free1)
        self.last_stats = {"engine_start_s": start_s, "engine_build_bytes": float(self._resident_bytes),
                           "free_after_build_bytes": float(free1)}
        if colocated:
            self.sleep()

    # ------------------------------------------------------------------------------------- state

    @property
    def engine(self) -> Any:
        if self._engine is None:
            raise RuntimeError("SGLangGenerator was shut down")
        return self._engine

    @property
    def asleep(self) -> bool:
        """True while any memory tag is released."""
        return bool(self._released)

    @property
    def released_tags(self) -> frozenset[str]:
        return frozenset(self._released)

    def _check_generate_allowed(self) -> None:
        if self._released:
            raise RuntimeError(f"generate refused: memory tags {sorted(self._released)} are released "
                               "(call wake_up first; the protocol is wake_up(['weights']), update_weights, "
                               "wake_up(['kv_cache']), generate, sleep)")
        if not self._weights_pushed:
            raise RuntimeError("generate refused: weights were woken but no update_weights followed "
                               "(SGLang discards released weights; push the policy weights first)")

    # ------------------------------------------------------------------------------------ generate

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: Sampling) -> GenerationOutput:
        """One response per prompt, with the sampled tokens' log-probabilities (temperature-scaled)."""
        self._check_generate_allowed()
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        if not prompts:
            return GenerationOutput([], [], [], stats={"generate_s": 0.0, "output_tokens": 0.0})
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        params: dict[str, Any] = {
            "max_new_tokens": int(sampling.max_new_tokens),
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "top_k": int(sampling.top_k),
            "min_p": float(sampling.min_p),
        }
        if sampling.stop_token_ids:
            params["stop_token_ids"] = [int(t) for t in sampling.stop_token_ids]
        if sampling.seed is not None:  # only honoured in SGLang's deterministic mode; distinct per request
            sp: Any = [dict(params, sampling_seed=derive_seed(int(sampling.seed), i)) for i in range(len(prompts))]
        else:
            sp = params
        t0 = time.perf_counter()
        outs = self.engine.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
        dt = time.perf_counter() - t0
        if len(outs) != len(prompts):
            raise RuntimeError(f"engine returned {len(outs)} outputs for {len(prompts)} prompts")
        ids, lps, reasons = [], [], []
        for i, o in enumerate(outs):
            meta = o["meta_info"]
            fr = meta.get("finish_reason") or {}
            kind = fr.get("type") if isinstance(fr, dict) else str(fr)
            if kind not in _FINISH:
                raise RuntimeError(f"request {i} did not finish normally: {fr!r}")
            out_ids = list(o["output_ids"])
            lp_entries = meta["output_token_logprobs"]
            if len(lp_entries) != len(out_ids):
                raise RuntimeError(f"request {i}: {len(lp_entries)} logprobs for {len(out_ids)} tokens")
            ids.append(out_ids)
            lps.append([float(e[0]) for e in lp_entries])
            reasons.append(_FINISH[kind])
        ntok = sum(len(x) for x in ids)
        stats = {"generate_s": dt, "output_tokens": float(ntok), "tokens_per_s": ntok / dt if dt > 0 else 0.0}
        self.last_stats.update(stats)
        return GenerationOutput(ids, lps, reasons, stats=dict(stats))

    # ---------------------------------------------------------------------------------- sleep/wake

    def sleep(self) -> None:
        """Release every resident memory tag and check that the memory really came back."""
        import torch

        resident = [t for t in WAKE_TAGS if t not in self._released]
        if not resident:
            return
        expected = self._resident_bytes
        at_build = self._at_build
        torch.cuda.synchronize()
        free_before = _free_bytes()
        t0 = time.perf_counter()
        self.engine.release_memory_occupation(tags=resident)
        rel_s = time.perf_counter() - t0
        self._released.update(resident)
        if "weights" in resident and not self._keeps_weights:
            self._weights_pushed = False
        min_frac = self.MIN_FREED_FRACTION_AT_BUILD if at_build else self.MIN_FREED_FRACTION
        need = int(min_frac * expected)
        freed = _free_bytes() - free_before
        deadline = time.perf_counter() + self.RELEASE_POLL_S
        while freed < need and time.perf_counter() < deadline:
            time.sleep(0.05)
            freed = _free_bytes() - free_before
        self._at_build = False
        self._new_cycle = True
        self._resident_bytes = 0
        self.last_stats.update({"sleep_s": rel_s, "sleep_freed_bytes": float(freed),
                                "sleep_expected_bytes": float(expected), "free_after_sleep_bytes": float(free_before + freed)})
        if freed < need:
            raise RuntimeError(
                f"SGLang engine sleep released only {freed / GiB:.2f} GiB of GPU memory, but the awake engine "
                f"occupied {expected / GiB:.2f} GiB (need >= {min_frac:.0%}); the trainer would run out of memory. "
                "Is enable_memory_saver on and is the memory saver working (LD_LIBRARY_PATH for libcudart)?")
        if at_build and freed < self.MIN_FREED_FRACTION * expected:
            log.warning("engine sleep after build freed %.2f of %.2f GiB (per-process overhead stays resident)",
                        freed / GiB, expected / GiB)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-acquire memory for ``tags`` (None = every released tag).

        Waking ``kv_cache`` also wakes ``cuda_graph`` when that is released (graphs use both).
        Waking ``weights`` makes ``generate`` refuse until :meth:`update_weights` is called.
        """
        if tags is None:
            todo = [t for t in WAKE_TAGS if t in self._released]
        else:
            tags = [tags] if isinstance(tags, str) else list(tags)
            bad = [t for t in tags if t not in WAKE_TAGS]
            if bad:
                raise ValueError(f"unknown wake tags {bad}; known: {list(WAKE_TAGS)}")
            awake = [t for t in tags if t not in self._released]
            if awake:
                raise RuntimeError(f"wake_up refused: {awake} not released (awake already); "
                                   f"released now: {sorted(self._released)}")
            todo = list(dict.fromkeys(tags))
            if "kv_cache" in todo and "cuda_graph" in self._released and "cuda_graph" not in todo:
                todo.append("cuda_graph")
        if not todo:
            return
        free_before = _free_bytes()
        t0 = time.perf_counter()
        self.engine.resume_memory_occupation(tags=todo)
        dt = time.perf_counter() - t0
        got = max(0, free_before - _free_bytes())
        self._released.difference_update(todo)
        self._resident_bytes += got
        if "weights" in todo and not self._keeps_weights:
            self._weights_pushed = False
        if self._new_cycle:  # per-cycle totals (wake, update) restart with the first wake after a sleep
            self._new_cycle = False
            for k in ("wake_s", "update_weights_s", "update_weights_bytes"):
                self.last_stats[k] = 0.0
        self.last_stats["wake_s"] = self.last_stats.get("wake_s", 0.0) + dt
        self.last_stats["wake_bytes"] = float(self._resident_bytes)

    # ----------------------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Any, *, flush_cache: bool | None = None) -> None:
        """Load new weights into the engine.

        ``named_tensors`` is one of:

        * a list of ``(hf_name, tensor)`` (CUDA tensors of this process; CPU tensors are moved);
        * an :class:`rlctl.weight_sync.IPCPayload` from ``serialize_for_ipc`` in another process
          (e.g. the trainer's Ray actor), or a list of them: forwarded to the engine as bytes,
          never deserialized here;
        * raw serialized bytes of a list of named CUDA tensors (``MultiprocessingSerializer``);
        * a :class:`rlctl.weight_sync.TensorParallelPayload` (or a list of them) for an engine of
          ``tp_size`` > 1: entry k goes to TP rank k (``serialized_named_tensors`` in TP-rank order).

        A single-rank payload (IPCPayload / bytes) on an engine of ``tp_size`` N is sent to all N ranks.

        Raises:
            RuntimeError: weights are released, or the engine reports a failure.
            ValueError: a TensorParallelPayload whose rank count is not ``tp_size``.

        The engine's prefix cache is flushed when the KV cache is resident (``flush_cache=None``).
        """
        if "weights" in self._released:
            raise RuntimeError("update_weights refused: weights are released; call wake_up(['weights']) first")
        if flush_cache is None:
            flush_cache = "kv_cache" not in self._released
        from rlctl.weight_sync import IPCPayload, TensorParallelPayload

        items = named_tensors
        if isinstance(items, (IPCPayload, TensorParallelPayload, bytes, bytearray, memoryview, str)):
            items = [items]
        items = list(items)
        if not items:
            raise ValueError("update_weights: nothing to load")
        t0 = time.perf_counter()
        nbytes = 0
        if all(isinstance(x, TensorParallelPayload) for x in items):
            for p in items:
                if len(p.per_rank) != self.tp_size:
                    raise ValueError(f"update_weights: a TensorParallelPayload of {len(p.per_rank)} ranks for an "
                                     f"engine of tp_size={self.tp_size}")
            for i, p in enumerate(items):
                nbytes += p.nbytes
                self._load_serialized([r.data for r in p.per_rank], p.load_format,
                                      flush_cache and i == len(items) - 1)
        elif all(isinstance(x, IPCPayload) for x in items):
            for i, p in enumerate(items):
                nbytes += p.nbytes
                self._load_serialized([p.data] * self.tp_size, p.load_format, flush_cache and i == len(items) - 1)
        elif all(isinstance(x, (bytes, bytearray, memoryview, str)) for x in items):
            for i, p in enumerate(items):
                self._load_serialized([p] * self.tp_size, None, flush_cache and i == len(items) - 1)
        elif all(isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], str) for x in items):
            import torch

            named = []
            for name, t in items:
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"update_weights: {name!r} is a {type(t).__name__}, not a tensor")
                if not t.is_cuda:  # the IPC path needs device memory
                    t = t.to(f"cuda:{torch.cuda.current_device()}")
                named.append((name, t.detach()))
                nbytes += t.numel() * t.element_size()
            ok, msg = self.engine.update_weights_from_tensor(named, flush_cache=flush_cache)
            self._check_ok(ok, msg, "update_weights_from_tensor")
        else:
            raise TypeError("update_weights takes a list of (name, tensor), IPCPayload(s) or serialized bytes; "
                            f"got a {type(named_tensors).__name__} of {type(items[0]).__name__}")
        dt = time.perf_counter() - t0
        self._weights_pushed = True
        self.last_stats["update_weights_s"] = self.last_stats.get("update_weights_s", 0.0) + dt
        self.last_stats["update_weights_bytes"] = self.last_stats.get("update_weights_bytes", 0.0) + nbytes

    def _load_serialized(self, per_rank: list, load_format: str | None, flush_cache: bool) -> None:
        """One ``UpdateWeightsFromTensorReqInput`` with ``serialized_named_tensors=per_rank`` (entry k for TP
        rank k; ``len(per_rank) == tp_size``)."""
        if load_format == "flattened_bucket":
            # 0.5.17's public API passes pre-serialized per-rank payloads through for this format
            ok, msg = self.engine.update_weights_from_tensor(per_rank, load_format=load_format, flush_cache=flush_cache)
        elif load_format is None:
            # the public API would serialize again: send the request the engine would have built
            from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput

            req = UpdateWeightsFromTensorReqInput(serialized_named_tensors=per_rank, load_format=None,
                                                  flush_cache=flush_cache)
            eng = self.engine
            ok, msg = eng.loop.run_until_complete(eng.tokenizer_manager.update_weights_from_tensor(req, None))
        else:
            raise ValueError(f"unknown load_format {load_format!r}")
        self._check_ok(ok, msg, f"update_weights_from_tensor(load_format={load_format})")

    @staticmethod
    def _check_ok(ok: Any, msg: Any, what: str) -> None:
        if not ok:
            raise RuntimeError(f"engine side: {what} failed: {msg}")

    # ------------------------------------------------------------------------- NCCL (not colocated)

    def _with_timeout(self, what: str, timeout_s: float, fn: Any, *args: Any, **kwargs: Any) -> Any:
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["out"] = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001
                box["err"] = e

        th = threading.Thread(target=run, name=f"rlctl-{what}", daemon=True)
        th.start()
        th.join(timeout_s)
        if th.is_alive():
            raise TimeoutError(f"engine side: {what} did not complete within {timeout_s:.0f}s (the trainer side "
                               "never joined or never broadcast?); the engine is unusable now, shut it down")
        if "err" in box:
            raise RuntimeError(f"engine side: {what} failed: {box['err']}") from box["err"]
        return box.get("out")

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "rlctl_weights", backend: str = "nccl",
                                  timeout_s: float = 120.0) -> None:
        """Join the NCCL weight-update group as ranks ``rank_offset..rank_offset+tp_size-1``; the trainer
        joins as rank 0 at the same time (:func:`rlctl.weight_sync.init_trainer_weight_group`)."""
        out = self._with_timeout("init_weights_update_group", timeout_s, self.engine.init_weights_update_group,
                                 master_address, master_port, rank_offset, world_size, group_name, backend)
        if isinstance(out, tuple) and out and not out[0]:
            raise RuntimeError(f"engine side: init_weights_update_group failed: {out[1]}")

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "rlctl_weights", load_format: str | None = None,
                                        timeout_s: float = 120.0) -> None:
        """Receive one bucket broadcast by the trainer (:func:`rlctl.weight_sync.broadcast_bucket`)."""
        if "weights" in self._released:
            raise RuntimeError("update_weights_from_distributed refused: weights are released; wake_up(['weights']) first")
        t0 = time.perf_counter()
        out = self._with_timeout("update_weights_from_distributed", timeout_s,
                                 self.engine.update_weights_from_distributed, names, dtypes, shapes, group_name,
                                 "kv_cache" not in self._released, load_format)
        if isinstance(out, tuple) and out and not out[0]:
            raise RuntimeError(f"engine side: update_weights_from_distributed failed: {out[1]}")
        self._weights_pushed = True
        self.last_stats["update_weights_s"] = self.last_stats.get("update_weights_s", 0.0) + time.perf_counter() - t0

    def destroy_weights_update_group(self, group_name: str = "rlctl_weights") -> None:
        self.engine.destroy_weights_update_group(group_name)

    # ----------------------------------------------------------------------------------- shutdown

    def shutdown(self) -> None:
        """Stop the engine (its scheduler process and memory); idempotent."""
        eng, self._engine = self._engine, None
        if eng is not None:
            eng.shutdown()

    def __enter__(self) -> "SGLangGenerator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:  # best effort; explicit shutdown() is the contract
        try:
            if getattr(self, "_engine", None) is not None:
                self.shutdown()
        except Exception:  # noqa: BLE001
            pass
