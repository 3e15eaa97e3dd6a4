"""The transformers generator backend (``hf``): batched ``model.generate`` on CPU or one GPU.

It implements :class:`rlctl.generator.Generator` with plain transformers, so the whole RL loop runs
in CI without a GPU. Token ids in, token ids out: nothing is decoded or re-encoded.

Prompts are left-padded into chunks of at most ``max_batch_size``; the attention mask (built here
from the prompt lengths) keeps padding invisible, so a prompt gives the same greedy tokens and
logprobs alone or in a batch (up to float rounding, about 1e-6 in float32).

Log-probabilities are ``log_softmax(raw_logits / temperature)`` at the sampled token (unscaled for
greedy), computed from ``output_logits=True`` -- the raw, unprocessed logits -- so top-k, top-p and
min-p cuts do not change them; this is what SGLang returns and what the trainer recomputes with a
full forward pass. Memory: generate keeps the logits of every step, ``chunk * steps * vocab * 4``
bytes (e.g. 64 x 256 x 49152 x 4 = 3.2 GB); lower ``max_batch_size`` for long responses.

State machine (shared by every backend; the loop's order is ``wake_up(["weights"])``,
``update_weights(...)``, ``wake_up(["kv_cache"])``, ``generate(...)``, ``sleep()``)::

    constructed ──> READY (weights and kv_cache awake, weights valid)
    sleep()                   -> every tag asleep (weights moved to CPU); no-op when asleep
    wake_up(tags)             -> wakes the tags (None = all); a tag already awake stays as it was.
                                 Waking "weights" marks them STALE (another backend may have
                                 discarded them while asleep).
    update_weights(named)     -> needs "weights" awake (RuntimeError otherwise); marks them valid.
    generate(...)             -> RuntimeError unless "weights" and "kv_cache" are awake and the
                                 weights are valid:
                                 "generator is asleep: ..." / "weights were woken but not updated:
                                 call update_weights before generate"
    shutdown()                -> SHUT DOWN; every later call but shutdown() raises RuntimeError.

``"cuda_graph"`` is accepted and tracked but not required (transformers captures no graphs).

Test: ``pytest tests/unit/test_generator_hf.py``.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch

from rlctl.generator import WAKE_TAGS, GenerationOutput, Sampling

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ERR_STALE = "weights were woken but not updated: call update_weights before generate"


class HFGenerator:
    """Rollouts with transformers ``generate``.

    Args:
        model_path: a Hugging Face model folder (config, safetensors, tokenizer, generation config).
        dtype: compute dtype of the weights: ``"float32"`` (default; exact logprob agreement with a
            float32 trainer), ``"bfloat16"`` or ``"float16"``.
        device: torch device string, ``"cpu"`` or ``"cuda[:N]"``.
        seed: base seed; call ``k`` (0, 1, ...) without ``Sampling.seed`` samples with a seed
            derived from ``(seed, k)``, so successive calls differ and a run is reproducible.
        max_batch_size: at most this many prompts go through one ``model.generate`` (sampled
            tokens depend on the chunking, greedy ones do not).

    Unknown keyword arguments raise ``TypeError`` naming them (Python's own check: there is no
    ``**kwargs``), so a misspelt option or another backend's option is never silently ignored.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int = 0,
        max_batch_size: int = 64,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_path = str(model_path)
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        self.seed = int(seed)
        self.max_batch_size = int(max_batch_size)
        self._calls = 0

        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])

        # Stop tokens when Sampling.stop_token_ids is empty: the checkpoint's generation config.
        eos = self.model.generation_config.eos_token_id
        self.default_stop_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys([eos] if isinstance(eos, int) else list(eos or []))
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        except (OSError, ValueError):  # a folder without a tokenizer
            pad = None
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        self.pad_token_id = int(pad) if isinstance(pad, int) else 0
        # A pristine generation config: generate() fills unset options from model.generation_config,
        # and a checkpoint's own sampling defaults (Qwen: top_k=20, repetition_penalty...) must not
        # leak into rollouts. Every option that matters is passed explicitly in generate().
        self.model.generation_config = GenerationConfig()

        self._awake = {tag: True for tag in WAKE_TAGS}
        self._weights_valid = True
        self._shut = False

    # ----------------------------------------------------------------------------- generation

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: Sampling) -> GenerationOutput:
        """Generate one response per prompt.

        Args:
            prompt_token_ids: B non-empty lists of token ids (no padding).
            sampling: see :class:`rlctl.generator.Sampling`. ``stop_token_ids`` empty means the
                checkpoint's generation-config EOS ids (:attr:`default_stop_token_ids`).

        Returns:
            :class:`GenerationOutput` with, per prompt, at most ``max_new_tokens`` response ids
            (cut right after the first stop token, which is kept), their logprobs (nats, under
            ``logits / temperature``; unscaled when greedy), and ``"stop"``/``"length"``.
            ``stats``: ``num_prompts``, ``num_output_tokens``, ``gen_time_s``, ``tokens_per_s``.
        """
        self._check_ready()
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.vocab_size}): {bad[:5]}")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
        if sampling.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {sampling.temperature}")

        stop_ids = tuple(dict.fromkeys(int(t) for t in (sampling.stop_token_ids or self.default_stop_token_ids)))
        call_seed = sampling.seed if sampling.seed is not None else _mix(self.seed, self._calls)
        self._calls += 1
        gen_kwargs = self._generate_kwargs(sampling, stop_ids)

        out = GenerationOutput(output_ids=[], logprobs=[], finish_reasons=[])
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=self._rng_devices()), torch.inference_mode():
            torch.manual_seed(call_seed)
            for start in range(0, len(prompts), self.max_batch_size):
                self._generate_chunk(prompts[start : start + self.max_batch_size], sampling, stop_ids, gen_kwargs, out)
        elapsed = time.perf_counter() - t0
        n_tokens = sum(len(ids) for ids in out.output_ids)
        out.stats = {
            "num_prompts": float(len(prompts)),
            "num_output_tokens": float(n_tokens),
            "gen_time_s": elapsed,
            "tokens_per_s": n_tokens / elapsed if elapsed > 0 else 0.0,
        }
        return out

    def _generate_kwargs(self, sampling: Sampling, stop_ids: tuple[int, ...]) -> dict[str, Any]:
        greedy = sampling.temperature == 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=int(sampling.max_new_tokens),
            min_new_tokens=None,
            do_sample=not greedy,
            num_beams=1,
            eos_token_id=list(stop_ids) if stop_ids else None,
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            use_cache=True,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
        )
        if greedy:
            pass  # warpers are unused without sampling; leaving them unset keeps generate quiet
        else:
            kwargs.update(
                temperature=float(sampling.temperature),
                top_p=float(sampling.top_p),
                top_k=int(sampling.top_k) if sampling.top_k > 0 else 0,  # -1 (and 0) = off
                min_p=float(sampling.min_p) if sampling.min_p > 0 else None,
            )
        return kwargs

    def _generate_chunk(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        stop_ids: tuple[int, ...],
        gen_kwargs: dict[str, Any],
        out: GenerationOutput,
    ) -> None:
        batch, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding
            input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[row, width - len(p) :] = 1
        result = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **gen_kwargs
        )
        tokens = result.sequences[:, width:]  # (batch, steps)
        scale = float(sampling.temperature) if sampling.temperature > 0 else 1.0
        # logprob of the chosen token at each step, one (batch, vocab) step at a time: (batch, steps)
        steps = tokens.shape[1]
        logprobs = torch.empty((batch, steps), dtype=torch.float32)
        for t, logits in enumerate(result.logits[:steps]):
            lp = torch.log_softmax(logits.float() / scale, dim=-1)
            logprobs[:, t] = lp.gather(-1, tokens[:, t : t + 1]).squeeze(-1).cpu()
        del result
        stop_set = set(stop_ids)
        tokens_list = tokens.cpu().tolist()
        for row in range(batch):
            ids = tokens_list[row]
            end = next((i + 1 for i, tok in enumerate(ids) if tok in stop_set), None)
            reason = "stop" if end is not None else "length"
            end = end if end is not None else min(len(ids), sampling.max_new_tokens)
            out.output_ids.append(ids[:end])
            out.logprobs.append(logprobs[row, :end].tolist())
            out.finish_reasons.append(reason)

    # ---------------------------------------------------------------------------- memory/state

    def sleep(self) -> None:
        """Release memory: weights to CPU (kept there, a no-op move on CPU), every tag asleep."""
        self._check_alive()
        if self._awake["weights"] and self.device.type != "cpu":
            self.model.to("cpu")
            _empty_cache(self.device)
        self._awake = {tag: False for tag in WAKE_TAGS}

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wake ``tags`` (subset of :data:`rlctl.generator.WAKE_TAGS`; None = all).

        Waking ``"weights"`` (when asleep) moves them back to the device and marks them stale:
        ``generate`` then raises until :meth:`update_weights` is called. Tags already awake are
        left as they are. Unknown tags raise ``ValueError``.
        """
        self._check_alive()
        wanted = list(WAKE_TAGS) if tags is None else list(tags)
        unknown = [t for t in wanted if t not in WAKE_TAGS]
        if unknown:
            raise ValueError(f"unknown wake_up tags {unknown}; known: {list(WAKE_TAGS)}")
        for tag in wanted:
            if self._awake[tag]:
                continue
            if tag == "weights":
                if self.device.type != "cpu":
                    self.model.to(self.device)
                self._weights_valid = False
            self._awake[tag] = True

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights into the model, by Hugging Face parameter name.

        Args:
            named_tensors: ``(name, tensor)`` pairs, names as in ``model.state_dict()`` (e.g.
                ``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``). Any subset of the
                parameters may be sent per call (buckets); with tied embeddings ``lm_head.weight``
                and ``model.embed_tokens.weight`` are the same tensor and either name works.
                Tensors are cast to the model's dtype and device; a DTensor is gathered first.

        Raises:
            KeyError: a name the model does not have (nothing is copied).
            ValueError: a tensor whose shape differs from the parameter's (nothing is copied).
            RuntimeError: the weights are asleep (call ``wake_up(["weights"])`` first).
        """
        self._check_alive()
        if not self._awake["weights"]:
            raise RuntimeError("weights are asleep: call wake_up(['weights']) before update_weights")
        targets = self.model.state_dict(keep_vars=True)  # includes both names of tied weights
        pairs = []
        for name, tensor in named_tensors:
            if name not in targets:
                raise KeyError(f"unknown parameter name {name!r} for {type(self.model).__name__}")
            if hasattr(tensor, "full_tensor"):  # torch.distributed DTensor
                tensor = tensor.full_tensor()
            if tuple(tensor.shape) != tuple(targets[name].shape):
                raise ValueError(
                    f"shape mismatch for {name!r}: got {tuple(tensor.shape)}, expected {tuple(targets[name].shape)}"
                )
            pairs.append((name, tensor))
        with torch.no_grad():
            for name, tensor in pairs:
                targets[name].copy_(tensor)
        self._weights_valid = True

    # --------------------------------------------------- weight broadcast (split placement)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "rlctl_weights", backend: str = "gloo",
                                  timeout_s: float = 120.0) -> None:
        """Join the trainer's weight-update group as rank ``rank_offset`` (same protocol and arguments
        as ``SGLangGenerator.init_weights_update_group``; gloo on CPU, nccl on CUDA).

        Raises:
            rlctl.weight_sync.WeightSyncError: naming the engine side, after ``timeout_s`` seconds.
        """
        from rlctl.weight_sync import join_weight_group

        self._check_alive()
        groups = self.__dict__.setdefault("_weight_groups", {})
        groups[group_name] = join_weight_group(master_address, master_port, world_size, rank_offset, group_name,
                                               timeout_s=timeout_s, backend=backend, side="engine")

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "rlctl_weights", load_format: str | None = None,
                                        timeout_s: float = 120.0) -> None:
        """Receive one bucket broadcast by the trainer (``rlctl.weight_sync.broadcast_bucket``) and load
        it like :meth:`update_weights`.

        Raises:
            RuntimeError: no group ``group_name`` (call :meth:`init_weights_update_group` first), or the
                weights are asleep.
            rlctl.weight_sync.WeightSyncError: the broadcast failed or timed out (engine side).
        """
        from rlctl.weight_sync import receive_bucket

        self._check_alive()
        group = self.__dict__.get("_weight_groups", {}).get(group_name)
        if group is None:
            raise RuntimeError(f"no weight-update group {group_name!r}: call init_weights_update_group first")
        if not self._awake["weights"]:
            raise RuntimeError("weights are asleep: call wake_up(['weights']) before update_weights_from_distributed")
        device = self.device if group_is_nccl(group) else "cpu"
        self.update_weights(receive_bucket(names, dtypes, shapes, group, load_format=load_format, device=device,
                                           timeout_s=timeout_s))

    def shutdown(self) -> None:
        """Free the model; idempotent. Every other method raises afterwards."""
        if self._shut:
            return
        self._shut = True
        device = self.device
        self.model = None
        _empty_cache(device)

    @property
    def state(self) -> str:
        """``"ready"``, ``"stale"`` (weights woken, not updated), ``"asleep"`` (some required tag
        asleep) or ``"shutdown"``."""
        if self._shut:
            return "shutdown"
        if not (self._awake["weights"] and self._awake["kv_cache"]):
            return "asleep"
        return "ready" if self._weights_valid else "stale"

    def _check_alive(self) -> None:
        if self._shut:
            raise RuntimeError("generator is shut down")

    def _check_ready(self) -> None:
        self._check_alive()
        asleep = [t for t in ("weights", "kv_cache") if not self._awake[t]]
        if asleep:
            raise RuntimeError(f"generator is asleep ({', '.join(asleep)}): call wake_up() before generate")
        if not self._weights_valid:
            raise RuntimeError(ERR_STALE)

    def _rng_devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []


def _mix(seed: int, call: int) -> int:
    """A 63-bit seed from ``(seed, call)`` (splitmix64), so nearby base seeds do not overlap."""
    z = (seed * 0x9E3779B97F4A7C15 + call + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def group_is_nccl(group: Any) -> bool:
    """Whether a process group runs NCCL (its tensors must then live on the GPU)."""
    try:
        return "nccl" in str(torch.distributed.get_backend(group)).lower()
    except Exception:  # noqa: BLE001 - not a registered group: assume CPU (gloo)
        return False


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
