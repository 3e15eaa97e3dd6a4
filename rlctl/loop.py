"""The GRPO training loop: one function, :func:`run`, that reads top to bottom, phases numbered and timed.

Per step: 1 generate (rollouts, ``n_samples_per_prompt`` per prompt), 2 reward (plus the overlong penalty;
with dynamic sampling ``filter`` 1-2 repeat on the next prompts until ``train_batch_size`` informative groups, see
:func:`fill_filtered_batch`; ``replace``: :func:`replace_flat`; both in :func:`step_rollouts`), 2b with
``trainer.algorithm.async_rollouts.one_step_off`` (split placement): push the previous step's weights and start the
next step's rollouts, which the engines generate during phases 3-5 (phase 1 of the next step collects them; rollouts
one optimizer step stale, corrected by ``off_policy_correction``; the checkpoint keeps them for an exact resume), 3 advantages,
4 old/ref log-probs (and the truncated importance-sampling weights of ``off_policy_correction``; with
``use_rollout_logprobs`` the engine's log-probs are the old ones and only the reference model runs), 5 train, 6 weight sync to the generators, 7 eval (every ``eval_interval``), 8 log,
9 checkpoint. Who holds the GPU changes only through calls of :class:`rlctl.colocation.Colocation`, each
one visible in :func:`run` or :func:`step_rollouts`; the loop never touches Ray, torch.distributed or an engine directly, so the ``hf``
and ``sglang`` backends run the same code.

Token ids flow end to end: the trained sequence is exactly prompt ids + output ids (the response text
is decoded only to score it).

Test: ``pytest tests/unit/test_loop.py`` (batch building, prompt filtering) and
``pytest tests/unit/test_colocation.py`` (the loop with recording fakes over an eval / checkpoint / resume grid),
``pytest tests/unit/test_one_step_off.py`` (one-step-off order, staleness and resume with fakes, and through Ray),
``pytest tests/unit/test_train_e2e.py`` (the whole loop through Ray on a tiny model).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rlctl import grpo
from rlctl.colocation import ResidencyError
from rlctl.generator import GenerationOutput, Sampling, derive_seed

PHASES = ("weight_sync", "generate", "reward", "advantages", "logprobs", "train", "eval", "log", "checkpoint")
# phases that are not training: timing/step minus these is a step's training time (trainer.max_train_time_s)
NOT_TRAINING = ("eval", "log", "checkpoint")


def train_seconds(phase_seconds: dict[str, float]) -> float:
    """A step's training time in seconds: the sum of its phases except eval, log (rollout dump) and checkpoint,
    i.e. ``timing/step - timing/eval - timing/log - timing/checkpoint``.

    Args:
        phase_seconds: seconds per phase (:attr:`PhaseTimer.seconds`, or a metrics row's ``timing/<phase>``
            values keyed by phase).
    """
    return sum(v for k, v in phase_seconds.items() if k not in NOT_TRAINING)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class PromptData:
    """Tokenized prompts of one split: ``prompt_ids[i]`` (chat template applied) and its row."""

    prompt_ids: list[list[int]]
    rows: list[dict]
    dropped_too_long: int = 0


def tokenize_prompts(rows: list[dict], tokenizer, max_prompt_length: int) -> PromptData:
    """Apply the chat template to each row's ``prompt`` messages and drop prompts over the limit.

    Args:
        rows: dicts with ``prompt`` (list of chat messages) and ``answer``.
        max_prompt_length: tokens; longer prompts are dropped and counted, never truncated.
    """
    ids, kept, dropped = [], [], 0
    for row in rows:
        messages = [dict(m) for m in row["prompt"]]
        toks = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        toks = list(toks["input_ids"]) if isinstance(toks, dict) or hasattr(toks, "keys") else list(toks)
        if len(toks) > max_prompt_length:
            dropped += 1
            continue
        ids.append(toks)
        kept.append(row)
    return PromptData(ids, kept, dropped)


def epoch_order(num_prompts: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffled prompt order of one epoch (same seed and epoch give the same order)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_prompts, generator=g).tolist()


def build_batch(prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pack N (prompt, response) token-id pairs into the trainer's batch layout.

    Returns ``input_ids`` / ``attention_mask`` [N, P+T] (prompt left-padded to P, response right-padded
    to T, P and T the longest in the batch, T ≥ 1) and ``response_mask`` [N, T] (1.0 on response tokens).
    """
    n = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(o) for o in output_ids))
    input_ids = torch.full((n, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + T), dtype=torch.long)
    resp_mask = torch.zeros((n, T), dtype=torch.float32)
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if o:
            input_ids[i, P:P + len(o)] = torch.tensor(o, dtype=torch.long)
            attn[i, P:P + len(o)] = 1
            resp_mask[i, :len(o)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attn, "response_mask": resp_mask}


def pad_logprobs(logprobs: Sequence[Sequence[float]], T: int) -> torch.Tensor:
    """[N, T] float32 tensor of per-token log-probs, zero-padded on the right."""
    out = torch.zeros((len(logprobs), T), dtype=torch.float32)
    for i, lp in enumerate(logprobs):
        if lp:
            out[i, :len(lp)] = torch.tensor(lp[:T], dtype=torch.float32)
    return out


def rollout_old_logprobs(logprobs: Sequence[Sequence[float]], output_ids: Sequence[Sequence[int]], T: int) -> torch.Tensor:
    """The engine's log-probs as the old policy of the ratio (``trainer.algorithm.use_rollout_logprobs``; slime's
    ``--use-rollout-logprobs``, verl's rollout-correction "bypass" mode): :func:`pad_logprobs`, after checking that
    every response token has one.

    Args:
        logprobs: N rows of per-token log-probs (nats) of the sampled tokens, as the generator returned them
            (after temperature scaling).
        output_ids: the N responses (token ids); row i needs ``len(output_ids[i])`` log-probs.
        T: the batch's response width (tokens).
    Returns:
        [N, T] float32, zero-padded on the right (the padding is outside ``response_mask``).
    Raises:
        RuntimeError: a row with fewer or more log-probs than response tokens (a zero would stand in for a missing
            log-prob and make that token's ratio exp(log pi)), naming the row and both counts.
    """
    for i, (lp, ids) in enumerate(zip(logprobs, output_ids)):
        if len(lp or []) != len(ids):
            raise RuntimeError(f"trainer.algorithm.use_rollout_logprobs=true: rollout {i} has {len(lp or [])} log-probs for "
                               f"{len(ids)} response tokens; the generator must return one log-prob per sampled token "
                               "(set trainer.algorithm.use_rollout_logprobs=false to recompute them in the trainer)")
    return pad_logprobs(logprobs, T)


class PromptOrder:
    """The training prompts in the order the loop consumes them: epoch after epoch of :func:`epoch_order`, each
    epoch cut to ``per_epoch`` prompts (``steps_per_epoch x train_batch_size``: the last partial batch is dropped).

    A position counts prompts consumed since the start of the run (the loop's ``data_position``, saved in
    checkpoints): without dynamic sampling it is ``step x train_batch_size``; with ``filter`` it advances by
    ``train_batch_size`` per generation, and a take may cross into the next (reshuffled) epoch.
    """

    def __init__(self, num_prompts: int, per_epoch: int, seed: int) -> None:
        self.num_prompts, self.per_epoch, self.seed = num_prompts, per_epoch, seed
        self._cache: dict[int, list[int]] = {}

    def epoch_of(self, position: int) -> int:
        """The epoch the prompt at ``position`` belongs to."""
        return position // self.per_epoch

    def take(self, position: int, count: int) -> list[int]:
        """Indices into the prompts of positions ``position .. position + count - 1``."""
        out = []
        for p in range(position, position + count):
            epoch, pos = divmod(p, self.per_epoch)
            if epoch not in self._cache:
                self._cache = {epoch: epoch_order(self.num_prompts, self.seed, epoch)}  # keep one epoch
            out.append(self._cache[epoch][pos])
        return out


def rollout_seed(seed_base: int, step: int, k: int) -> int:
    """Sampling seed of the ``k``-th generation (0, 1, ...) of ``step`` (``k > 0``: the extra generations of dynamic
    sampling): :func:`rlctl.generator.derive_seed` of ``(seed_base, step, k)``; engines and requests derive theirs
    from it the same way, so no two (step, generation, engine, request) share a seed."""
    return derive_seed(seed_base, step, k)


@dataclass
class Rollouts:
    """The samples of one generation (or of a step's batch), group-major: ``n`` consecutive samples per prompt.

    ``prompts`` / ``rows`` / ``out`` / ``texts`` / ``scored``: N entries each; ``rewards`` [N] float32 (task reward
    + ``penalty``), ``penalty`` [N] the overlong penalty, ``loss_keep`` [N] 1.0 for samples that enter the loss
    (0.0 for the padding groups of :func:`fill_filtered_batch`).
    """

    prompts: list
    rows: list
    out: GenerationOutput
    texts: list
    scored: list
    rewards: torch.Tensor
    penalty: torch.Tensor
    loss_keep: torch.Tensor

    def take(self, idx: torch.Tensor) -> "Rollouts":
        """The samples at ``idx`` ([K] int64), in that order."""
        ix = idx.tolist()
        o = self.out
        return Rollouts([self.prompts[i] for i in ix], [self.rows[i] for i in ix],
                        GenerationOutput([o.output_ids[i] for i in ix], [o.logprobs[i] for i in ix],
                                         [o.finish_reasons[i] for i in ix]),
                        [self.texts[i] for i in ix], [self.scored[i] for i in ix], self.rewards[idx], self.penalty[idx],
                        self.loss_keep[idx])

    @staticmethod
    def cat(parts: Sequence["Rollouts"]) -> "Rollouts":
        """All samples of ``parts``, in order."""
        return Rollouts([p for r in parts for p in r.prompts], [p for r in parts for p in r.rows],
                        GenerationOutput([x for r in parts for x in r.out.output_ids],
                                         [x for r in parts for x in r.out.logprobs],
                                         [x for r in parts for x in r.out.finish_reasons]),
                        [x for r in parts for x in r.texts], [x for r in parts for x in r.scored],
                        torch.cat([r.rewards for r in parts]), torch.cat([r.penalty for r in parts]),
                        torch.cat([r.loss_keep for r in parts]))


def fill_filtered_batch(informative: Sequence[Rollouts], flat: Sequence[Rollouts], groups: int, n: int) -> Rollouts:
    """The training batch of DAPO dynamic sampling (``filter``): exactly ``groups`` prompt groups of ``n`` samples.

    The first ``groups`` informative groups in generation order (the rest of the last generation's are dropped).
    When the loop gave up (``max_sample_batches`` generations without enough of them), the batch is topped up with
    the first flat groups it generated, with ``loss_keep`` 0: they keep the batch at ``train_batch_size`` prompts,
    so the world-size shards, mini-batches and optimizer steps stay as configured, but they add no token to the
    loss (as ``trainer.algorithm.zero_variance_filter`` drops them). Source: Yu et al. 2025 (DAPO, arXiv:2503.14476).

    Args:
        informative / flat: per generation, its informative / flat groups (group-major).
        groups: ``trainer.train_batch_size``; n: ``generator.n_samples_per_prompt``.
    Returns:
        ``groups x n`` samples.
    """
    good = Rollouts.cat(informative)
    k = min(len(good.prompts), groups * n)
    parts = [good.take(torch.arange(k))]
    if k < groups * n:
        pad = Rollouts.cat(flat).take(torch.arange(groups * n - k))
        pad.loss_keep = torch.zeros(groups * n - k)
        parts.append(pad)
    return Rollouts.cat(parts)


def replace_flat(ro: Rollouts, n: int, min_replace_ratio: float, seed: int) -> tuple[Rollouts, int]:
    """POLARIS dynamic sampling (``replace``): when at least ``min_replace_ratio`` of the groups are informative,
    every flat group is overwritten by a copy of a random informative one (:func:`rlctl.grpo.replace_flat_groups`,
    donors drawn with ``torch.Generator().manual_seed(seed)``); otherwise the batch is kept as it is.
    Source: An et al. 2025 (POLARIS); SkyRL ``handle_replace_sampling``.

    Returns:
        ``(batch, replaced_groups)``: the same number of samples, and how many groups were replaced (0 when kept).
    """
    informative = grpo.informative_groups(ro.rewards, n)
    ratio = informative.float().mean().item()
    if ratio < min_replace_ratio or bool(informative.all()):
        return ro, 0
    idx = grpo.replace_flat_groups(ro.rewards, n, generator=torch.Generator().manual_seed(seed))
    return ro.take(idx), int((~informative).sum())


# ---------------------------------------------------------------------------------------------- reward
def make_reward_fn(env_cfg) -> Callable[[str, str, list[int]], dict[str, float]]:
    """The reward of one response: the shared GSM8K scorer, or ``environment.reward.custom_reward_fn``.

    Returns a function ``(response_text, ground_truth, response_ids) -> {"reward", "formatted",
    "correct_strict", "correct_flexible"}`` (floats).
    """
    from rlctl.gsm8k import load_custom_reward, score_response

    rcfg = env_cfg.reward
    custom = load_custom_reward(rcfg.custom_reward_fn) if rcfg.custom_reward_fn else None

    def reward(text: str, gold: str, ids: list[int]) -> dict[str, float]:
        r = score_response(text, gold, method=rcfg.method, correct_score=rcfg.correct_score,
                           format_score=rcfg.format_score, flexible_score=rcfg.flexible_score)
        score = float(custom(response=text, ground_truth=gold, response_ids=ids)) if custom else r.score
        return {"reward": score, "formatted": float(r.formatted), "correct_strict": float(r.correct_strict),
                "correct_flexible": float(r.correct_flexible)}

    return reward


def overlong_penalties(buffer_cfg, output_ids: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
    """DAPO's soft overlong punishment of ``trainer.algorithm.overlong_buffer``, added to the rewards before the
    advantages (Yu et al. 2025, arXiv:2503.14476 eq. 13; :func:`rlctl.grpo.overlong_penalty`).

    Args:
        buffer_cfg: the section (``len`` tokens or None = off, ``penalty_factor``).
        output_ids: N responses (token ids); their lengths are in tokens.
        max_new_tokens: ``generator.sampling_params.max_new_tokens``, the generation limit.
    Returns:
        [N] float32 penalties <= 0 (all 0 when off): 0 up to ``max_new_tokens - len`` tokens, then linearly down
        to ``-penalty_factor`` at ``max_new_tokens``.
    """
    lengths = torch.tensor([len(o) for o in output_ids], dtype=torch.float32)
    if buffer_cfg.len is None:
        return torch.zeros_like(lengths)
    return grpo.overlong_penalty(lengths, max_new_tokens, buffer_cfg.len, buffer_cfg.penalty_factor)


def compute_advantages(algo, rewards: torch.Tensor, n: int, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence advantages with ``trainer.algorithm.advantage_estimator`` (:func:`rlctl.grpo.compute_advantages`).

    Args:
        algo: the ``trainer.algorithm`` section.
        rewards: [N] float32, group-major (``n`` samples per prompt).
        n: ``generator.n_samples_per_prompt``.
        response_mask: [N, T] loss mask (after the zero-variance / overlong filters); ``reinforce++``
            weights its batch mean and std by each response's tokens in it, as SkyRL and verl do.
    Returns:
        [N] float32 advantages: ``grpo`` (Shao et al. 2024; ``grpo_norm_by_std=false`` is Dr. GRPO), ``rloo``
        (Ahmadian et al. 2024), ``reinforce++`` (Hu 2025, outcome reward, batch whitening).
    """
    name = algo.advantage_estimator
    if name == "grpo":
        return grpo.compute_advantages(name, rewards, n, norm_by_std=algo.grpo_norm_by_std)
    if name == "reinforce++":
        return grpo.compute_advantages(name, rewards, n, response_lengths=response_mask.sum(1))
    return grpo.compute_advantages(name, rewards, n)


def add_tis_weights(opc, batch: dict[str, torch.Tensor], rollout_lp: torch.Tensor) -> dict[str, float]:
    """Truncated importance-sampling weights of ``trainer.algorithm.off_policy_correction`` into ``batch``.

    With ``tis_ratio_type`` null nothing happens. Otherwise ``batch["tis_weights"]`` [N, T] float32 becomes
    :func:`rlctl.grpo.tis_weights` of ``batch["old_logprobs"]`` (the trainer's pi_old) against ``rollout_lp``
    (the engine's log-probs of the same tokens) over ``batch["response_mask"]``, capped at
    ``token_tis_ratio_clip_high`` or ``sequence_tis_ratio_clip_high``; the trainer multiplies each token's policy
    loss by it (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; SkyRL
    ``off_policy_correction``).

    Returns:
        ``off_policy/tis_ratio_mean`` / ``_max`` (ratio before the cap) and ``off_policy/tis_ratio_truncated_fraction``
        (tokens, or sequences for ``sequence``, over the cap); ``{}`` when off.
    """
    if opc.tis_ratio_type is None:
        return {}
    cap = opc.token_tis_ratio_clip_high if opc.tis_ratio_type == "token" else opc.sequence_tis_ratio_clip_high
    weights, m = grpo.tis_weights(batch["old_logprobs"], rollout_lp, batch["response_mask"],
                                  ratio_type=opc.tis_ratio_type, clip_high=cap)
    batch["tis_weights"] = weights.float()
    return {"off_policy/tis_ratio_mean": m["tis_ratio_mean"], "off_policy/tis_ratio_max": m["tis_ratio_max"],
            "off_policy/tis_ratio_truncated_fraction": m["tis_truncated_fraction"]}


# ---------------------------------------------------------------------------------------------- a step's rollouts
@dataclass
class RolloutSource:
    """What the training rollouts are made of, fixed for a run (built by :func:`run`): the prompts in
    :class:`PromptOrder`, ``generator.sampling_params`` with the per-step seeds of :func:`rollout_seed`, and the
    reward (plus the overlong penalty)."""

    train: PromptData
    order: PromptOrder
    batch_prompts: int  # trainer.train_batch_size: prompts per generation
    n: int  # generator.n_samples_per_prompt
    seed_base: int
    sampling_params: Any  # the generator.sampling_params section
    stop_token_ids: Sequence[int]
    tokenizer: Any
    reward_fn: Callable[[str, str, list[int]], dict[str, float]]
    overlong_buffer: Any  # the trainer.algorithm.overlong_buffer section

    def prompts(self, position: int) -> tuple[list[list[int]], list[dict]]:
        """The ``batch_prompts`` prompts at ``position`` (prompts consumed so far), each ``n`` times in a row
        (group-major): ``(prompt ids, rows)``, ``batch_prompts x n`` entries each."""
        idx = self.order.take(position, self.batch_prompts)
        return ([self.train.prompt_ids[i] for i in idx for _ in range(self.n)],
                [self.train.rows[i] for i in idx for _ in range(self.n)])

    def sampling(self, step: int, k: int) -> Sampling:
        """The sampling of the ``k``-th generation of ``step`` (seeded by :func:`rollout_seed`)."""
        return sampling_from(self.sampling_params, self.stop_token_ids, seed=rollout_seed(self.seed_base, step, k))

    def score(self, prompts: list, rows: list, out: GenerationOutput) -> Rollouts:
        """Decode and reward one generation (rewards [N] include the overlong penalty)."""
        texts = self.tokenizer.batch_decode(out.output_ids, skip_special_tokens=True)
        scored = [self.reward_fn(t, r["answer"], ids) for t, r, ids in zip(texts, rows, out.output_ids)]
        rewards = torch.tensor([s["reward"] for s in scored], dtype=torch.float32)
        penalty = overlong_penalties(self.overlong_buffer, out.output_ids, self.sampling_params.max_new_tokens)
        return Rollouts(prompts, rows, out, texts, scored, rewards + penalty, penalty, torch.ones(len(prompts)))


@dataclass
class StepRollouts:
    """The result of :func:`step_rollouts`: the step's batch, the sampling it used, the data position after it, the
    dynamic-sampling and engine metrics, and the weight version (optimizer steps) of its first generation."""

    ro: Rollouts
    sampling: Sampling
    position: int
    ds_metrics: dict[str, float]
    gen_stats: dict[str, float]
    weight_version: int


def step_rollouts(src: RolloutSource, colo, ds, step: int, position: int, timer: "PhaseTimer",
                  started=None) -> StepRollouts:
    """Phases 1 (rollout) and 2 (reward) of a step, repeated on the next prompts by dynamic sampling ``filter``
    until ``train_batch_size`` informative groups (:func:`fill_filtered_batch`), or ``replace``d
    (:func:`replace_flat`).

    Args:
        src: the run's :class:`RolloutSource`; colo: the :class:`rlctl.colocation.Colocation`.
        ds: the ``trainer.algorithm.dynamic_sampling`` section.
        position: prompts consumed before this step.
        started: one-step-off, the step's first generation, started while the previous step trained (an
            ``AsyncRollout`` of :meth:`Colocation.rollout_async`, or restored from a checkpoint): collected
            instead of generated. None: generate now.
    Raises:
        rlctl.colocation.ResidencyError: through the colocation calls (e.g. ``started`` is too stale), or
            ``started`` holds another step's rollouts.
    """
    if started is not None and started.step != step:
        raise ResidencyError(f"step {step} was handed step {started.step}'s rollouts (one-step-off order broken)")
    n, tbs = src.n, src.batch_prompts
    informative_parts: list[Rollouts] = []  # dynamic sampling "filter": informative groups, in generation order
    flat_parts: list[Rollouts] = []
    informative = k = 0
    gave_up = False
    version = -1  # the weight version of the first generation
    # the engine stays awake (weights and KV cache) over every generation of this step: dynamic sampling's extra
    # batches need no second weight push, since the trainer does not change the weights within a step
    awake, entered = ExitStack(), False
    try:
        while True:  # one pass without dynamic sampling "filter"; with it, until the batch is full or we give up
            prompts, rows = src.prompts(position)
            position += tbs
            sampling = src.sampling(step, k)
            # 1 rollout: the engine gets current weights (pushed in phase 6 of the previous step, or here after a
            # resume), the trainer leaves the GPU, the engine wakes its KV cache and generates (and sleeps once
            # the step's last generation is done). One-step-off: the engines generated this batch while the
            # previous step trained; wait for it
            if started is not None and k == 0:
                with timer("generate"):
                    out = colo.collect(started)
                first_version = started.weight_version
            else:
                if not entered:
                    with timer("weight_sync"):
                        colo.sync_weights()
                        colo.offload_trainer()
                with timer("generate"):
                    if not entered:
                        awake.enter_context(colo.rollout())
                        entered = True
                    first_version = colo.engine_version
                    out = colo.generate(prompts, sampling)
            if k == 0:
                version = first_version
            k += 1

            # 2 reward (+ the overlong penalty)
            with timer("reward"):
                ro = src.score(prompts, rows, out)
            if ds.type != "filter":
                break
            # DAPO dynamic sampling: keep the informative groups, generate the next prompts until there are enough
            keep = grpo.select_informative(ro.rewards, n)
            flat = torch.tensor(sorted(set(range(len(prompts))) - set(keep.tolist())), dtype=torch.long)
            informative_parts.append(ro.take(keep))
            flat_parts.append(ro.take(flat))
            informative += len(keep) // n
            if informative >= tbs:
                break
            if k >= ds.max_sample_batches:
                gave_up = True
                break
    finally:
        with timer("generate"):
            awake.close()  # the engine sleeps (shared GPU) after the step's last generation
    gen_stats = colo.generators.last_stats()  # after the sleep: its seconds and freed bytes are this step's
    ds_metrics: dict[str, float] = {}
    if ds.type == "filter":
        ro = fill_filtered_batch(informative_parts, flat_parts, tbs, n)
        ds_metrics = {"dynamic_sampling/sample_batches": float(k), "dynamic_sampling/gave_up": float(gave_up),
                      "dynamic_sampling/informative_groups": float(min(informative, tbs))}
    elif ds.type == "replace":
        ro, replaced = replace_flat(ro, n, ds.min_replace_ratio, seed=rollout_seed(src.seed_base, step, 0))
        ds_metrics = {"dynamic_sampling/replaced_groups": float(replaced)}
    return StepRollouts(ro, sampling, position, ds_metrics, gen_stats, version)


def in_flight_state(rollout, out: GenerationOutput) -> dict[str, Any]:
    """The one-step-off rollouts in flight at a checkpoint (``AsyncRollout`` ``rollout``, collected as ``out``) as
    checkpoint state (tensors and plain values: the trainer state is loaded with ``weights_only=True``):
    ``step``, ``weight_version``, ``finish_reasons``, ``output_ids`` [sum of lengths] int64 with ``output_lengths``
    [N], ``logprobs`` [sum of lengths] float32 with ``logprob_lengths`` [N]. :func:`output_from_state` inverts it
    (the log-probs round-trip through float32, which is what the loop computes with)."""
    return {"step": rollout.step, "weight_version": rollout.weight_version, "finish_reasons": list(out.finish_reasons),
            "output_ids": torch.tensor([t for o in out.output_ids for t in o], dtype=torch.int64),
            "output_lengths": torch.tensor([len(o) for o in out.output_ids], dtype=torch.int64),
            "logprobs": torch.tensor([x for lp in out.logprobs for x in (lp or [])], dtype=torch.float32),
            "logprob_lengths": torch.tensor([len(lp or []) for lp in out.logprobs], dtype=torch.int64)}


def output_from_state(state: dict[str, Any]) -> GenerationOutput:
    """The ``GenerationOutput`` saved by :func:`in_flight_state`."""
    ids = [t.tolist() for t in torch.split(state["output_ids"], state["output_lengths"].tolist())]
    lps = [t.tolist() for t in torch.split(state["logprobs"], state["logprob_lengths"].tolist())]
    return GenerationOutput(ids, lps, list(state["finish_reasons"]))


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class PhaseTimer:
    """Wall seconds per phase of one step (``timing/<phase>``)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


def sampling_from(params, stop_token_ids: Sequence[int], seed: int | None) -> Sampling:
    """Build :class:`Sampling` from a validated ``generator.sampling_params`` section."""
    stops = tuple(params.stop_token_ids) if params.stop_token_ids else tuple(stop_token_ids)
    return Sampling(max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                    top_k=params.top_k, min_p=params.min_p, stop_token_ids=stops, seed=seed)


# ---------------------------------------------------------------------------------------------- eval
def eval_sampling_from(cfg, stop_token_ids: Sequence[int]) -> Sampling:
    """Eval sampling of a run config: ``generator.eval_sampling_params``, seeded by its ``seed`` if set,
    else ``trainer.seed`` (used by the loop's evals and by ``rlctl eval``)."""
    params = cfg.generator.eval_sampling_params
    return sampling_from(params, stop_token_ids, seed=params.seed if params.seed is not None else cfg.trainer.seed)


def evaluate(generate: Callable[[list, Sampling], Any], prompts: PromptData, tokenizer, sampling: Sampling,
             batch_size: int, n_samples: int = 1) -> dict[str, float]:
    """Accuracy on a validation split: greedy pass@1 (``n_samples=1``), or ``n_samples`` samples per problem.

    Args:
        generate: ``(prompt_ids, sampling) -> GenerationOutput``, e.g. :meth:`rlctl.colocation.Colocation.generate`
            inside its ``rollout()`` block, or a generator group's ``generate``.
        sampling: ``generator.eval_sampling_params`` (:func:`eval_sampling_from`).
        batch_size: prompts per ``generate`` call (``trainer.eval_batch_size``); each is repeated ``n_samples``
            times in the call (group-major).
        n_samples: ``generator.eval_n_samples_per_prompt`` (k).
    Returns:
        ``n_samples=1``: ``eval/accuracy_strict``, ``eval/accuracy_flexible`` (fraction of problems solved),
        ``eval/format_rate``, ``eval/response_length_mean`` (tokens), ``eval/num_problems``.
        ``n_samples=k > 1``: ``eval/accuracy_strict_mean`` / ``eval/accuracy_flexible_mean`` (fraction of all samples
        correct: the pass@1 estimate), ``eval/pass@<k>_strict`` / ``eval/pass@<k>_flexible`` (mean over problems of
        :func:`rlctl.grpo.pass_at_k` (n=k, c=correct samples, k): the fraction of problems with a correct sample;
        Chen et al. 2021), ``eval/format_rate`` and ``eval/response_length_mean`` over samples,
        ``eval/num_problems``, ``eval/samples_per_problem``.
    """
    from rlctl.gsm8k import score_response

    k = n_samples
    strict = flexible = formatted = 0.0
    pass_strict = pass_flexible = 0.0
    lengths = 0
    n = len(prompts.prompt_ids)
    for start in range(0, n, batch_size):
        chunk = prompts.prompt_ids[start:start + batch_size]
        out = generate([p for p in chunk for _ in range(k)], sampling)
        texts = tokenizer.batch_decode(out.output_ids, skip_special_tokens=True)
        for j, row in enumerate(prompts.rows[start:start + batch_size]):
            c_strict = c_flexible = 0
            for text, ids in zip(texts[j * k:(j + 1) * k], out.output_ids[j * k:(j + 1) * k]):
                r = score_response(text, row["answer"])
                c_strict += int(r.correct_strict)
                c_flexible += int(r.correct_flexible)
                formatted += r.formatted
                lengths += len(ids)
            strict += c_strict
            flexible += c_flexible
            pass_strict += grpo.pass_at_k(k, c_strict, k)
            pass_flexible += grpo.pass_at_k(k, c_flexible, k)
    d = max(n, 1)
    if k == 1:
        return {"eval/accuracy_strict": strict / d, "eval/accuracy_flexible": flexible / d,
                "eval/format_rate": formatted / d, "eval/response_length_mean": lengths / d,
                "eval/num_problems": float(n)}
    return {"eval/accuracy_strict_mean": strict / (d * k), "eval/accuracy_flexible_mean": flexible / (d * k),
            f"eval/pass@{k}_strict": pass_strict / d, f"eval/pass@{k}_flexible": pass_flexible / d,
            "eval/format_rate": formatted / (d * k), "eval/response_length_mean": lengths / (d * k),
            "eval/num_problems": float(n), "eval/samples_per_problem": float(k)}


# ---------------------------------------------------------------------------------------------- loop
def run(cfg, colo, tokenizer, train: PromptData, val: PromptData | None, logger, checkpointer,
        stop_token_ids: Sequence[int]) -> dict[str, Any]:
    """Run GRPO until ``trainer.max_steps``, the end of ``trainer.epochs``, ``trainer.max_wall_time_s`` or
    ``trainer.max_train_time_s``.

    Training time (``trainer.max_train_time_s``): each step adds :func:`train_seconds` of its phases (not eval,
    log or checkpoint) to a total in seconds, logged as ``timing/train_time_total_s`` and saved in the checkpoint
    (``train_time_s``), so a resumed run continues the same budget. The step after which the total reaches the
    budget is the last one (final eval, checkpoint, ``stopped_because="max_train_time_s"``).

    Args:
        cfg: the validated :class:`rlctl.config.RunConfig`.
        colo: the :class:`rlctl.colocation.Colocation` of the job; its ``trainers`` / ``generators`` are the
            groups of :mod:`rlctl.job.groups` (or any objects with their methods). Every change of who holds
            the GPU is one of its calls below.
        train / val: tokenized prompts (:func:`tokenize_prompts`).
        logger: ``rlctl.metrics.RunLogger``; checkpointer: ``rlctl.checkpoint.Checkpointer``.
        stop_token_ids: the model's end-of-turn / EOS ids (``generation_config.json``).
    Returns:
        ``{"last_step", "stopped_because", "final_eval"}``.
    """
    trainers = colo.trainers
    t_cfg, g_cfg, algo = cfg.trainer, cfg.generator, cfg.trainer.algorithm
    n = g_cfg.n_samples_per_prompt
    steps_per_epoch = len(train.prompt_ids) // t_cfg.train_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"data.train_data has {len(train.prompt_ids)} usable prompts, fewer than "
                         f"trainer.train_batch_size={t_cfg.train_batch_size}")
    total_steps = steps_per_epoch * t_cfg.epochs
    if t_cfg.max_steps is not None:
        total_steps = min(total_steps, t_cfg.max_steps)
    mini_per_rank = t_cfg.policy_mini_batch_size * n // trainers.world_size
    reward_fn = make_reward_fn(cfg.environment)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids[0]
    # per-step sampling seeds derive from generator.sampling_params.seed (else trainer.seed): reproducible
    # rollouts, so a resumed run repeats the uninterrupted one
    seed_base = g_cfg.sampling_params.seed if g_cfg.sampling_params.seed is not None else t_cfg.seed
    eval_sampling = eval_sampling_from(cfg, stop_token_ids)
    eval_enabled = val is not None and (t_cfg.eval_interval > 0 or t_cfg.eval_before_train)

    ds = algo.dynamic_sampling
    tbs = t_cfg.train_batch_size
    order = PromptOrder(len(train.prompt_ids), steps_per_epoch * tbs, t_cfg.seed)
    src = RolloutSource(train, order, tbs, n, seed_base, g_cfg.sampling_params, stop_token_ids, tokenizer, reward_fn,
                        algo.overlong_buffer)
    # one-step-off (split placement): the engines generate step k+1's rollouts while the trainer trains step k
    one_step_off = algo.async_rollouts.one_step_off
    ahead = None  # the next step's rollouts in flight (rlctl.colocation.AsyncRollout), one-step-off only

    # 0 resume (the trainer is resident: it was just built); the engines then need the restored weights
    done = 0  # last finished step
    train_time = 0.0  # seconds: sum of the finished steps' train_seconds (checkpoint state, trainer.max_train_time_s)
    data_position = 0  # prompts consumed (in epoch_order); saved in checkpoints next to "step"
    colo.onload_trainer()
    restored = checkpointer.restore(trainers)
    if restored is not None:
        done = restored["step"]
        # checkpoints written before data_position was saved: every step consumed train_batch_size prompts
        data_position = restored.get("data_position", done * tbs)
        # checkpoints written before train_time_s was saved: the budget restarts at 0 (said below)
        train_time = float(restored.get("train_time_s", 0.0))
        if "train_time_s" not in restored and t_cfg.max_train_time_s is not None:
            logger.console.log(f"note: the checkpoint of step {done} holds no training time (written before "
                               "trainer.max_train_time_s existed): the budget counts from 0 s at this resume")
        logger.truncate_after(done)
        logger.mark_resumed()
    for note in checkpointer.notes:
        logger.console.log(f"note: {note}")
    if done >= total_steps:
        logger.console.log(f"note: the checkpoint of step {done} already completes this run's {total_steps} steps: "
                           "nothing to train (use a new trainer.run_name, trainer.resume_mode=none, or raise "
                           "trainer.max_steps / trainer.epochs)")
    budget = t_cfg.max_train_time_s
    if budget is not None and train_time >= budget and done < total_steps:
        logger.console.log(f"note: the checkpoint of step {done} has used {train_time:.1f} s of "
                           f"trainer.max_train_time_s={budget:g}: nothing to train (use a new trainer.run_name or "
                           "raise trainer.max_train_time_s)")
        total_steps = done  # the loop below runs no step
    colo.mark_stale(version=done)
    saved = (restored or {}).get("in_flight")
    if saved is not None and done < total_steps:
        # one-step-off: the checkpoint holds the next step's rollouts (generated with the weights of the step
        # before it): train on exactly them, so the resumed run repeats the uninterrupted one
        if one_step_off:
            ahead = colo.adopt(saved["step"], saved["weight_version"], output_from_state(saved))
        else:
            logger.console.log(f"note: the checkpoint holds step {saved['step']}'s one-step-off rollouts; "
                               "trainer.algorithm.async_rollouts.one_step_off is now false: generating them again "
                               "with the restored weights")
    wall_start = time.time()
    stopped_because = "max_steps" if t_cfg.max_steps is not None and total_steps == t_cfg.max_steps else "epochs"
    if budget is not None and train_time >= budget:
        stopped_because = "max_train_time_s"
    last_eval: dict[str, float] = {}

    def run_eval() -> dict[str, float]:
        # one-step-off: wait for the rollouts in flight (kept for the next step); eval pushes only weights the
        # engine does not have yet
        if ahead is not None:
            colo.collect(ahead)
        colo.sync_weights()
        colo.offload_trainer()
        with colo.rollout():
            return evaluate(colo.generate, val, tokenizer, eval_sampling, t_cfg.eval_batch_size,
                            g_cfg.eval_n_samples_per_prompt)

    if done == 0 and t_cfg.eval_before_train and val is not None:
        timer = PhaseTimer()
        with timer("eval"):
            last_eval = run_eval()
        logger.log(0, {**last_eval, **timer.metrics()})

    logger.start_progress(total_steps, done)
    while done < total_steps:
        step = done + 1
        timer = PhaseTimer()
        epoch = order.epoch_of(data_position)

        # 1-2 rollout and reward (step_rollouts; dynamic sampling repeats them); one-step-off: collect the
        # rollouts the engines generated while the previous step trained
        overlapped = ahead is not None
        sr = step_rollouts(src, colo, ds, step, data_position, timer, started=ahead)
        data_position, sampling = sr.position, sr.sampling
        ro, ds_metrics, gen_stats = sr.ro, sr.ds_metrics, sr.gen_stats
        prompts, rows, out, texts, scored, rewards, penalty = (ro.prompts, ro.rows, ro.out, ro.texts, ro.scored,
                                                               ro.rewards, ro.penalty)
        rollout_lag = colo.trainer_version - sr.weight_version  # optimizer steps the rollout weights are behind

        # 2b one-step-off: push the previous step's weights to the now idle engines and start the next step's
        # rollouts; the engines generate them while phases 3-5 run here (step k+1 trains on step k-1's weights)
        ahead = None
        if one_step_off and step < total_steps:
            with timer("weight_sync"):
                colo.sync_weights()
            ahead = colo.rollout_async(src.prompts(data_position)[0], src.sampling(step + 1, 0), step=step + 1)

        # 3 advantages (per sequence, broadcast over its tokens by the loss)
        with timer("advantages"):
            batch = build_batch(prompts, out.output_ids, pad_id)
            T = batch["response_mask"].shape[1]
            keep = torch.ones(len(prompts))
            if algo.zero_variance_filter:
                keep = keep * grpo.zero_variance_sample_mask(rewards, n)
            if g_cfg.apply_overlong_filtering:
                keep = keep * torch.tensor([0.0 if f == "length" else 1.0 for f in out.finish_reasons])
            keep = keep * ro.loss_keep  # dynamic sampling "filter" pads a short batch with flat groups kept out of the loss
            batch["response_mask"] = batch["response_mask"] * keep[:, None]
            advantages = compute_advantages(algo, rewards, n, batch["response_mask"])
            batch["advantages"] = advantages
            # the engine's log-probs [N, T]; with use_rollout_logprobs also the old policy (checked: one per token)
            rollout_lp = (rollout_old_logprobs(out.logprobs, out.output_ids, T) if algo.use_rollout_logprobs
                          else pad_logprobs(out.logprobs, T))

        # 4 old / reference log-probs (the trainer comes back to the GPU; the engine is asleep, or, one-step-off,
        # generating the next step's rollouts on its own GPUs); use_rollout_logprobs: the engine's are the old policy
        with timer("logprobs"):
            colo.onload_trainer()
            if algo.use_rollout_logprobs:
                batch["old_logprobs"] = rollout_lp
            else:
                batch["old_logprobs"] = trainers.compute_logprobs(batch, sampling.temperature, "policy")
            if algo.use_kl_loss:
                batch["ref_logprobs"] = trainers.compute_logprobs(batch, sampling.temperature, "ref")
            tis_metrics = add_tis_weights(algo.off_policy_correction, batch, rollout_lp)

        # 5 train: the engine's weights are stale from here on
        with timer("train"):
            train_metrics = trainers.train_step(batch, sampling.temperature, mini_per_rank)
            colo.mark_stale(version=step)

        # 6 push the new weights to the engines (wake weights, push; the trainer stays resident until the next
        # KV-cache wake, so a checkpoint right after needs no onload). One-step-off: the engines are generating the
        # next step's rollouts; the push waits until the next step collected them (phase 2b)
        if ahead is None:
            with timer("weight_sync"):
                colo.sync_weights()

        # 7 eval (every eval_interval steps, and after the last step when eval is on)
        metrics = rollout_metrics(out, scored, rewards, advantages, n, batch, rollout_lp, timer)
        if algo.use_rollout_logprobs:  # old log-probs are the rollout's: no trainer/engine comparison this step
            metrics.pop("policy/rollout_train_logprobs_abs_diff_mean")
        metrics.update(tis_metrics)
        metrics.update(ds_metrics)
        if algo.overlong_buffer.len is not None:
            metrics["reward/overlong_penalty_mean"] = penalty.mean().item()
        metrics.update(train_metrics)
        metrics.update({f"generator/{k}": v for k, v in gen_stats.items()})
        metrics.update({f"generator/{k}": float(v) for k, v in colo.push_stats.items()})
        if one_step_off:
            metrics["rollout/weight_version_lag"] = float(rollout_lag)
            if overlapped:  # timing/generate was only the wait for rollouts generated during the previous step
                metrics["rollout/tokens_per_s"] = math.nan
        if colo.shared_gpu:
            metrics["memory/trainer_reserved_bytes_at_kv_wake"] = float(colo.take_kv_wake_bytes())
        metrics["data/epoch"] = float(epoch)
        metrics["data/prompts_consumed"] = float(data_position)
        metrics["data/dropped_long_prompts"] = float(train.dropped_too_long)
        done = step
        # the step's training time: its phases so far (eval, log and checkpoint come below and are not counted)
        train_time += train_seconds(timer.seconds)
        out_of_budget = budget is not None and train_time >= budget
        out_of_time = t_cfg.max_wall_time_s is not None and time.time() - wall_start >= t_cfg.max_wall_time_s
        final = step == total_steps or out_of_time or out_of_budget
        eval_now = (t_cfg.eval_interval > 0 and step % t_cfg.eval_interval == 0 and val is not None) or (
            final and eval_enabled)
        ckpt_now = (t_cfg.ckpt_interval > 0 and step % t_cfg.ckpt_interval == 0) or final
        if ahead is not None and (eval_now or ckpt_now):
            # one-step-off: the eval / checkpoint waits for the rollouts in flight; that wait is generation (the next
            # step's collect is then instant), so it is timed as such and counted in the training time
            waited = timer.seconds.get("generate", 0.0)
            with timer("generate"):
                colo.collect(ahead)
            train_time += timer.seconds["generate"] - waited
        metrics["timing/train_time_total_s"] = train_time
        if eval_now:
            with timer("eval"):
                last_eval = run_eval()
            metrics.update(last_eval)

        # 8 log
        with timer("log"):
            if t_cfg.rollout_dump_interval > 0 and step % t_cfg.rollout_dump_interval == 0:
                logger.dump_rollouts(step, rows, texts, scored, out.finish_reasons)
        # 9 checkpoint (the trainer on the GPU; the next rollout offloads it again before the KV cache wakes).
        # One-step-off: with the next step's rollouts (waited for), so a resume trains on exactly them
        if ckpt_now:
            with timer("checkpoint"):
                colo.onload_trainer()
                extra: dict[str, Any] = {"step": step, "data_position": data_position, "train_time_s": train_time}
                if ahead is not None:
                    extra["in_flight"] = in_flight_state(ahead, colo.collect(ahead))
                checkpointer.save(trainers, extra)
        metrics.update(timer.metrics())
        metrics["timing/step"] = sum(timer.seconds.values())
        logger.log(step, metrics)
        if out_of_budget and step < total_steps:
            stopped_because = "max_train_time_s"
            break
        if out_of_time:
            stopped_because = "max_wall_time_s"
            break
    logger.finish_progress()
    return {"last_step": done, "stopped_because": stopped_because, "final_eval": last_eval}


def rollout_metrics(out, scored, rewards, advantages, n, batch, rollout_lp, timer) -> dict[str, float]:
    """Reward, length, truncation, advantage, group-variance and log-prob-agreement metrics of a step."""
    lengths = torch.tensor([len(o) for o in out.output_ids], dtype=torch.float32)
    mask = batch["response_mask"]
    full_mask = (torch.arange(mask.shape[1])[None, :] < lengths[:, None]).float()
    diff = ((batch["old_logprobs"] - rollout_lp).abs() * full_mask).sum() / full_mask.sum().clamp(min=1)
    gen_s = timer.seconds.get("generate", 0.0)
    zero_var = grpo.zero_variance_groups(rewards, n)
    m = {
        "reward/mean": rewards.mean().item(),
        "reward/format_rate": sum(s["formatted"] for s in scored) / len(scored),
        "reward/accuracy_strict": sum(s["correct_strict"] for s in scored) / len(scored),
        "reward/accuracy_flexible": sum(s["correct_flexible"] for s in scored) / len(scored),
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "response/truncation_rate": sum(f == "length" for f in out.finish_reasons) / len(out.finish_reasons),
        "advantages/mean": advantages.mean().item(),
        "advantages/std": advantages.std().item() if advantages.numel() > 1 else 0.0,
        "advantages/max": advantages.max().item(),
        "advantages/min": advantages.min().item(),
        "groups/zero_variance_fraction": zero_var.float().mean().item(),
        "policy/rollout_train_logprobs_abs_diff_mean": diff.item(),
        "rollout/tokens": lengths.sum().item(),
        "rollout/tokens_per_s": lengths.sum().item() / gen_s if gen_s > 0 else math.nan,
        "train/loss_tokens": mask.sum().item(),
        # prompt + response tokens the trainer runs forward/backward over per update epoch (no padding);
        # benchmarks/step_breakdown.py turns them into training tokens/s and MFU
        "train/tokens": float(batch["attention_mask"].sum().item()),
        "train/padded_tokens": float(batch["attention_mask"].numel()),
    }
    return m
