"""Who holds the GPU: one object, :class:`Colocation`, owns the residency of the trainer and the engines.

State (three variables, nothing else decides residency):

- trainer: ``resident`` (parameters, gradients, optimizer state on the GPU) or ``offloaded`` (on the host);
- engine: ``asleep`` (all memory released), ``weights`` (weights awake, no KV cache) or ``awake`` (fully awake);
- engine weights: ``current`` (the trainer's latest weights), ``stale`` (an optimizer step or a checkpoint restore
  happened since the last push) or ``released`` (the engine slept and discarded them).

The loop (:func:`rlctl.loop.run`) calls the transitions one by one, so each is visible there, like slime's
``train.py``::

    colo.sync_weights()      # weight sync: [onload trainer] -> wake engine weights -> push   (skipped when current)
    colo.offload_trainer()   # the trainer leaves the GPU
    with colo.rollout():     # engine wakes its KV cache -> generate ... -> engine sleeps (weights released)
        out = colo.generate(prompts, sampling)
    colo.onload_trainer()    # log-probs, training, checkpoint need the trainer on the GPU
    colo.mark_stale()        # after the optimizer step

An impossible order raises :class:`ResidencyError` instead of happening: waking the KV cache while the trainer is
resident on a shared GPU, onloading the trainer while the engine's KV cache is awake, generating on stale or
released weights, pushing to an engine whose weights are asleep. On a shared GPU (``colocated`` and CUDA) the
engine sleeps after each rollout; in split placement the engine never sleeps and the trainer never offloads, and
the same calls only push when the weights are stale.

The object knows the trainer and generator groups only by their methods (:class:`TrainerSide`,
:class:`GeneratorSide`), so it imports nothing from the Ray job and is tested with recording fakes on CPU.

Test: ``pytest tests/unit/test_colocation.py`` (the transitions and the real loop over an eval / checkpoint /
resume / wall-time grid with recording fakes).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol, Sequence

TRAINER_STATES = ("resident", "offloaded")
ENGINE_STATES = ("asleep", "weights", "awake")
WEIGHT_STATES = ("current", "stale", "released")


class ResidencyError(RuntimeError):
    """A transition that would break the colocation invariant (e.g. the engine's KV cache woken while the
    colocated trainer holds the GPU, or generating on stale weights)."""


class TrainerSide(Protocol):
    """What the colocation object needs of the trainer group (``rlctl.job.groups.TrainerGroup``)."""

    def onload(self) -> None: ...
    def offload(self) -> None: ...
    def push_weights(self, generators: Any) -> dict[str, float]: ...
    def memory_reserved(self) -> int: ...


class GeneratorSide(Protocol):
    """What the colocation object needs of the generator group (``rlctl.job.groups.GeneratorGroup``)."""

    def wake_up(self, tags: list[str]) -> None: ...
    def sleep(self) -> None: ...
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: Any) -> Any: ...


class Colocation:
    """Residency of one trainer group and one generator group, and the checked transitions between them.

    Args:
        trainers: the trainer group (:class:`TrainerSide`).
        generators: the generator group (:class:`GeneratorSide`).
        shared_gpu: trainer and engines share GPUs (``trainer.placement.colocate_all`` on CUDA): the trainer
            offloads before the engine wakes its KV cache, and the invariant is enforced.
        engine_sleeps: the engines sleep after each rollout (``colocate_all``; also the ``hf`` backend on CPU).
        engine_state: the engines' state when the job starts (``asleep`` for a colocated SGLang engine, which
            releases its memory right after it is built; ``awake`` otherwise).
        on_transition: called with ``(name, state)`` after each transition (``state`` from :meth:`state`);
            the loop logs them and the GPU test checks the trainer's memory at each engine wake.
    """

    def __init__(self, trainers: TrainerSide, generators: GeneratorSide, *, shared_gpu: bool, engine_sleeps: bool,
                 engine_state: str = "awake", on_transition: Callable[[str, dict[str, str]], None] | None = None) -> None:
        if engine_state not in ENGINE_STATES:
            raise ValueError(f"engine_state must be one of {ENGINE_STATES}, got {engine_state!r}")
        self.trainers, self.generators = trainers, generators
        self.shared_gpu, self.engine_sleeps = shared_gpu, engine_sleeps
        self.trainer = "resident"  # a freshly built trainer holds its weights on its device
        self.engine = engine_state
        # the engines load the model from the same path as the trainer, but a restored checkpoint or a
        # trainer that differs in dtype makes them stale: the loop marks them stale before the first rollout
        self.weights = "released" if engine_state == "asleep" else "current"
        self.on_transition = on_transition
        self.history: list[str] = []
        self.push_stats: dict[str, float] = {}
        # the largest CUDA reserve of the trainer seen at a KV-cache wake since the loop last read it (bytes;
        # logged as memory/trainer_reserved_bytes_at_kv_wake)
        self.trainer_bytes_at_kv_wake = 0

    # ------------------------------------------------------------------ state
    def take_kv_wake_bytes(self) -> int:
        """The largest trainer CUDA reserve (bytes) seen at a KV-cache wake since the last call; resets it."""
        held, self.trainer_bytes_at_kv_wake = self.trainer_bytes_at_kv_wake, 0
        return held

    def state(self) -> dict[str, str]:
        """``{"trainer", "engine", "weights"}`` now."""
        return {"trainer": self.trainer, "engine": self.engine, "weights": self.weights}

    def _record(self, name: str) -> None:
        self.history.append(name)
        if self.on_transition is not None:
            self.on_transition(name, self.state())

    def _refuse(self, what: str, why: str) -> None:
        raise ResidencyError(f"colocation: {what} refused: {why} (state {self.state()}; last transitions "
                             f"{self.history[-6:]})")

    # ------------------------------------------------------------------ trainer
    def onload_trainer(self) -> None:
        """Bring the trainer's parameters and optimizer state to the GPU (no-op when resident).

        Raises:
            ResidencyError: on a shared GPU while the engine's KV cache is awake.
        """
        if self.trainer == "resident":
            return
        if self.shared_gpu and self.engine == "awake":
            self._refuse("onload_trainer", "the engine's KV cache is awake on the same GPU")
        self.trainers.onload()
        self.trainer = "resident"
        self._record("onload_trainer")

    def offload_trainer(self) -> None:
        """Move the trainer to the host (shared GPU only; elsewhere the trainer stays where it is)."""
        if not self.shared_gpu or self.trainer == "offloaded":
            return
        self.trainers.offload()
        self.trainer = "offloaded"
        self._record("offload_trainer")

    # ------------------------------------------------------------------ weights
    def mark_stale(self) -> None:
        """The trainer's weights changed (optimizer step, checkpoint restore): the engine's copy is stale."""
        if self.weights == "current":
            self.weights = "stale"
            self._record("mark_stale")

    def sync_weights(self) -> dict[str, float]:
        """Weight sync phase: when the engine's weights are not current, onload the trainer (the full
        tensors are gathered on its GPU), wake the engine's weights if asleep, and push. Returns the push's
        stats (bytes, buckets, seconds), empty when nothing was pushed.

        Raises:
            ResidencyError: (only through :meth:`onload_trainer`) the engine's KV cache is awake on a shared GPU.
        """
        if self.weights == "current":
            return {}
        self.onload_trainer()
        if self.engine == "asleep":
            self.generators.wake_up(["weights"])
            self.engine = "weights"
            self._record("wake_engine_weights")
        stats = self.trainers.push_weights(self.generators)
        self.push_stats = dict(stats or {})
        self.weights = "current"
        self._record("push_weights")
        return self.push_stats

    # ------------------------------------------------------------------ rollout
    @contextmanager
    def rollout(self) -> Iterator[None]:
        """Engine fully awake for the block (generate with :meth:`generate` inside), asleep after it when the
        engines sleep (their weights are then released).

        Raises:
            ResidencyError: the engine's weights are not current (stale or released), or, on a shared GPU, the
                trainer is still resident.
        """
        if self.weights != "current":
            self._refuse("rollout", f"the engine's weights are {self.weights}; call sync_weights() first")
        if self.shared_gpu and self.trainer == "resident":
            self._refuse("rollout (waking the KV cache)", "the trainer is resident on the same GPU; "
                         "call offload_trainer() first")
        if self.engine == "weights":
            if self.shared_gpu:  # what the offloaded trainer still holds when the KV cache takes the GPU
                held = int(self.trainers.memory_reserved())
                self.trainer_bytes_at_kv_wake = max(self.trainer_bytes_at_kv_wake, held)
            self.generators.wake_up(["kv_cache", "cuda_graph"])
            self.engine = "awake"
            self._record("wake_engine_kv")
        elif self.engine == "asleep":  # cannot happen with current weights; kept as a guard
            self._refuse("rollout", "the engine is asleep")
        try:
            yield
        finally:
            if self.engine_sleeps and self.engine != "asleep":
                self.generators.sleep()
                self.engine = "asleep"
                self.weights = "released"
                self._record("sleep_engine")

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: Any) -> Any:
        """Generate inside :meth:`rollout` (the engine must be fully awake on current weights).

        Raises:
            ResidencyError: called outside :meth:`rollout` or on weights that are not current.
        """
        if self.engine != "awake" or self.weights != "current":
            self._refuse("generate", "only inside rollout(), on current weights")
        return self.generators.generate(prompt_ids, sampling)
