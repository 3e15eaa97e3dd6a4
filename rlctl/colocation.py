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

One-step-off overlap (split placement only, ``trainer.algorithm.async_rollouts.one_step_off``): the engines
generate step k+1's rollouts while the trainer trains step k::

    out_k = colo.collect(handle_k)                  # started during step k-1; weights of step k-2
    colo.sync_weights()                             # push step k-1's weights (the engines are idle now)
    handle_k1 = colo.rollout_async(prompts, sampling, step=k + 1)   # runs on the engines from here ...
    ... log-probs, train step k; colo.mark_stale(version=k) ...     # ... while the trainer trains
    out_k1 = colo.collect(handle_k1)                # next step: the push of step k's weights only after this

Weight versions (optimizer steps: the loop passes ``version=step`` to :meth:`Colocation.mark_stale`, and the step
of a restored checkpoint) tell how stale rollouts are: :meth:`Colocation.collect` refuses rollouts more than one
version behind the trainer, and nothing may push, wake, generate or start another rollout while one is in flight.

The object knows the trainer and generator groups only by their methods (:class:`TrainerSide`,
:class:`GeneratorSide`), so it imports nothing from the Ray job and is tested with recording fakes on CPU.

Test: ``pytest tests/unit/test_colocation.py`` (the transitions and the real loop over an eval / checkpoint /
resume / wall-time grid with recording fakes), ``pytest tests/unit/test_one_step_off.py`` (the one-step-off order,
staleness and resume with recording fakes).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
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
    def generate_async(self, prompt_ids: Sequence[Sequence[int]], sampling: Any) -> Any: ...
    def collect(self, handle: Any) -> Any: ...


#: one-step-off: rollouts may be generated with weights at most this many optimizer steps behind the trainer's
MAX_LAG = 1


@dataclass
class AsyncRollout:
    """A rollout started by :meth:`Colocation.rollout_async` (or restored from a checkpoint).

    ``step``: the training step whose batch it is; ``weight_version``: the optimizer steps in the engine weights
    that generate it; ``ref``: the generator group's handle (None once collected); ``output``: the
    ``GenerationOutput`` once collected.
    """

    step: int
    weight_version: int
    ref: Any = None
    output: Any = None


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
        # weight versions (optimizer steps): the trainer's, and the one the engines hold (None: released / unknown)
        self.trainer_version = 0
        self.engine_version: int | None = None if engine_state == "asleep" else 0
        self.in_flight: AsyncRollout | None = None  # the one-step-off rollout the engines are generating
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
        """``{"trainer", "engine", "weights"}`` now (plus ``"in_flight"``, the step, while a rollout runs)."""
        st = {"trainer": self.trainer, "engine": self.engine, "weights": self.weights}
        if self.in_flight is not None:
            st["in_flight"] = f"step {self.in_flight.step}"
        return st

    def _refuse_in_flight(self, what: str) -> None:
        if self.in_flight is not None:
            self._refuse(what, f"the engines are generating step {self.in_flight.step}'s rollouts; "
                         "call collect() first")

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
    def mark_stale(self, version: int | None = None) -> None:
        """The trainer's weights changed (optimizer step, checkpoint restore): the engine's copy is stale.

        Args:
            version: the trainer's weight version now (optimizer steps done: the loop passes the step just
                trained, or the restored checkpoint's step); None counts one more.
        """
        self.trainer_version = self.trainer_version + 1 if version is None else version
        if self.weights == "current":
            self.weights = "stale"
            self._record("mark_stale")

    def sync_weights(self) -> dict[str, float]:
        """Weight sync phase: when the engine's weights are not current, onload the trainer (the full
        tensors are gathered on its GPU), wake the engine's weights if asleep, and push. Returns the push's
        stats (bytes, buckets, seconds), empty when nothing was pushed.

        Raises:
            ResidencyError: a one-step-off rollout is in flight (the engines are busy), or (through
                :meth:`onload_trainer`) the engine's KV cache is awake on a shared GPU.
        """
        if self.weights == "current":
            return {}
        self._refuse_in_flight("sync_weights")
        self.onload_trainer()
        if self.engine == "asleep":
            self.generators.wake_up(["weights"])
            self.engine = "weights"
            self._record("wake_engine_weights")
        stats = self.trainers.push_weights(self.generators)
        self.push_stats = dict(stats or {})
        self.weights = "current"
        self.engine_version = self.trainer_version
        self._record("push_weights")
        return self.push_stats

    # ------------------------------------------------------------------ rollout
    @contextmanager
    def rollout(self) -> Iterator[None]:
        """Engine fully awake for the block (generate with :meth:`generate` inside), asleep after it when the
        engines sleep (their weights are then released).

        Raises:
            ResidencyError: the engine's weights are not current (stale or released), a one-step-off rollout is
                in flight, or, on a shared GPU, the trainer is still resident.
        """
        self._refuse_in_flight("rollout")
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
                self.engine_version = None
                self._record("sleep_engine")

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: Any) -> Any:
        """Generate inside :meth:`rollout` (the engine must be fully awake on current weights).

        Raises:
            ResidencyError: called outside :meth:`rollout` or on weights that are not current.
        """
        if self.engine != "awake" or self.weights != "current":
            self._refuse("generate", "only inside rollout(), on current weights")
        return self.generators.generate(prompt_ids, sampling)

    # ------------------------------------------------------------------ one-step-off rollout
    def rollout_async(self, prompt_ids: Sequence[Sequence[int]], sampling: Any, *, step: int) -> AsyncRollout:
        """Start generating ``step``'s rollouts on the engines and return at once (one-step-off overlap): the
        trainer trains the previous step meanwhile; :meth:`collect` waits for them.

        Args:
            prompt_ids: N prompts (token ids); sampling: their ``Sampling``; step: the step they are for.
        Returns:
            the :class:`AsyncRollout`, tagged with the engines' weight version.
        Raises:
            ResidencyError: on a shared GPU or with engines that sleep (the trainer needs the GPU while the
                engines would generate), with weights that are not current, or while another rollout is in flight.
        """
        if self.shared_gpu or self.engine_sleeps:
            self._refuse("rollout_async", "the engines share the trainer's GPU or sleep after each rollout; "
                         "one-step-off overlap needs split placement (trainer.placement.colocate_all=false)")
        self._refuse_in_flight("rollout_async")
        if self.weights != "current" or self.engine != "awake":
            self._refuse("rollout_async", f"the engine is {self.engine} with {self.weights} weights; call "
                         "sync_weights() first")
        assert self.engine_version is not None  # current weights always have a version
        self.in_flight = AsyncRollout(step, self.engine_version, self.generators.generate_async(prompt_ids, sampling))
        self._record("rollout_async")
        return self.in_flight

    def adopt(self, step: int, weight_version: int, output: Any) -> AsyncRollout:
        """An already generated rollout of ``step`` (restored from a checkpoint) as a collected
        :class:`AsyncRollout`; :meth:`collect` checks its staleness like a fresh one's.

        Raises:
            ResidencyError: a rollout is in flight.
        """
        self._refuse_in_flight("adopt")
        return AsyncRollout(step, weight_version, None, output)

    def collect(self, rollout: AsyncRollout) -> Any:
        """Wait for a rollout of :meth:`rollout_async` and return its ``GenerationOutput`` (the same object
        again when it was collected already, e.g. before an eval or a checkpoint).

        Raises:
            ResidencyError: ``rollout`` is neither the one in flight nor collected, or its weights are more
                than :data:`MAX_LAG` versions behind the trainer's (it would train on older rollouts than
                one-step-off allows).
        """
        if rollout.output is None:
            if rollout is not self.in_flight:
                self._refuse("collect", f"the rollout of step {rollout.step} is not the one in flight")
            rollout.output = self.generators.collect(rollout.ref)
            rollout.ref = None
            self.in_flight = None
            self._record("collect_rollout")
        lag = self.trainer_version - rollout.weight_version
        if lag > MAX_LAG:
            self._refuse("collect", f"step {rollout.step}'s rollouts come from weight version "
                         f"{rollout.weight_version}, {lag} versions behind the trainer's {self.trainer_version} "
                         f"(at most {MAX_LAG})")
        return rollout.output
