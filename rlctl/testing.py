"""Test fixtures that need no download: a tiny random Llama with a byte-level tokenizer.

:func:`build_tiny_llama` writes a complete Hugging Face model folder (``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``) that every part of rlctl can load like a real checkpoint: the generator
backends, the trainer, the chat-template prompt builder. It takes well under a second on 2 CPU cores.

:func:`trainer_section` builds the ``trainer`` section of the run config for tests and probes that drive
:class:`rlctl.trainer.PolicyTrainer` directly: the real, validated schema model, so a renamed field fails there.

:func:`masked_response_logprobs` is the trainer's forward as it was until 2026-12-07 (an explicit attention mask),
the reference path of the GPU gradient checks (``tests/gpu/test_trainer_gradient.py``,
``benchmarks/attention_grad_check.py``); :func:`logprob_loss_gradient` and :func:`gradient_error` are their loss
and their comparison with a reference.

Tokenizer: byte-level BPE with no merges, so every UTF-8 byte is one token and any text encodes.
Vocabulary (ids are stable, tests may rely on them)::

    0 <|endoftext|>   (pad, unk)
    1 <|im_start|>    (bos)
    2 <|im_end|>      (eos; the chat end-of-turn token, like SmolLM2)
    3 .. 258          the 256 bytes, in the GPT-2 byte-to-unicode order

The chat template is ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``) with an optional
``<|im_start|>assistant\\n`` generation prompt and no default system message.

Test: ``pytest tests/unit/test_models.py -k tiny``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlctl.config.schema import TrainerConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    """The byte-level tokenizer described in the module docstring, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for the bytes
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # GPT-2 order: the stand-in for byte b is bytes_to_unicode()[b]; sort by that byte value.
    order = sorted(alphabet, key=_byte_of)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(order)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in bs:
        return ord(ch)
    extra = [b for b in range(256) if b not in bs]
    return extra[ord(ch) - 256]


def build_tiny_llama(
    out_dir: str | os.PathLike,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` (float32) with the byte tokenizer to ``out_dir``.

    Args:
        out_dir: folder to create (replaced if it exists); parents are created.
        seed: the weights are a deterministic function of ``seed`` (and the sizes); the global
            torch RNG state is left untouched.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: model sizes
            (``hidden_size`` must be divisible by ``num_heads``; head_dim = hidden_size / num_heads).
        max_position_embeddings: longest sequence (prompt + response) in tokens.
        tie_word_embeddings: ``lm_head.weight`` shares ``model.embed_tokens.weight`` (as in SmolLM2).
        initializer_range: std of the normal weight init.

    Returns:
        ``Path(out_dir)``. The generation config has ``eos_token_id=2`` (``<|im_end|>``),
        ``pad_token_id=0``, ``bos_token_id=1``. Vocabulary size :data:`TINY_VOCAB_SIZE` (259).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir).expanduser()
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        rms_norm_eps=1e-6,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)

    from rlctl.metrics import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        build_tiny_tokenizer().save_pretrained(tmp)
    return out


def tiny_run_overrides(model_path: str, root: str | os.PathLike, run_name: str, max_steps: int, *, workers: int = 1,
                       reward_fn: str | None = None, **extra: object) -> list[str]:
    """``key=value`` overrides for a seconds-long CPU training run of a tiny model (tests only).

    The run uses the bundled GSM8K sample, 2 prompts x 4 samples per step, 12 new tokens, the ``hf``
    backend's shapes on ``workers`` trainer workers / engines, a checkpoint every step, no eval, KL
    and weight decay off and a high learning rate (so two steps visibly change the policy). Outputs
    go under ``root/runs`` and ``root/ckpts``. ``reward_fn`` (``"file.py:function"``) replaces the
    GSM8K reward; ``extra`` keys (dotted paths) override any of the above.
    """
    from rlctl.gsm8k import SAMPLE_DIR

    root = Path(root)
    o: dict[str, object] = {
        "trainer.policy.model.path": model_path,
        "data.train_data": f"['{SAMPLE_DIR}/train.parquet']",
        "data.val_data": f"['{SAMPLE_DIR}/validation.parquet']",
        "trainer.placement.policy_num_gpus_per_node": workers,
        "generator.num_inference_engines": workers,
        "trainer.train_batch_size": 2,
        "trainer.policy_mini_batch_size": 2,
        "generator.n_samples_per_prompt": 4,
        "trainer.micro_train_batch_size_per_gpu": 2,
        "trainer.micro_forward_batch_size_per_gpu": 4,
        "trainer.max_prompt_length": 1024,
        "generator.sampling_params.max_new_tokens": 12,
        "trainer.eval_before_train": "false",
        "trainer.eval_interval": -1,
        "trainer.max_steps": max_steps,
        "trainer.ckpt_interval": 1,
        "trainer.max_ckpts_to_keep": 5,
        "trainer.algorithm.use_kl_loss": "false",
        "trainer.policy.optimizer_config.weight_decay": 0.0,
        "trainer.policy.optimizer_config.lr": 2e-3,
        "trainer.gradient_checkpointing": "false",
        "trainer.device": "cpu",
        "trainer.log_path": str(root / "runs"),
        "trainer.ckpt_path": str(root / "ckpts"),
        "trainer.run_name": run_name,
    }
    if reward_fn:
        o["environment.reward.custom_reward_fn"] = reward_fn
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def trainer_section(overrides: Mapping[str, object] | None = None, *, base: TrainerConfig | None = None,
                    **kw: object) -> TrainerConfig:
    """The ``trainer`` section of the run config (:class:`rlctl.config.schema.TrainerConfig`, frozen) with the
    schema defaults except ``overrides`` and ``kw`` (tests and probes only).

    Args:
        overrides: dotted keys relative to ``trainer.`` and Python values, e.g.
            ``{"algorithm.use_kl_loss": False, "policy.optimizer_config.lr": 1e-2}``.
        base: start from this section instead of the schema defaults (the model is frozen: to change a
            built section, e.g. ``tr.tcfg``, build a new one from it and assign that).
        kw: top-level trainer keys, e.g. ``micro_train_batch_size_per_gpu=2`` (applied after ``overrides``).

    The result goes through the schema's own validation (strict types, ranges, unknown keys), but not through
    the cross-section rules of :func:`rlctl.config.load_config` (batch sizes against the placement and the
    generator, a decaying scheduler needs ``max_steps``): the trainer alone needs none of the other sections,
    and tests check the trainer's own guards with values those rules refuse.

    Raises:
        KeyError: a key that is not a leaf of the trainer section (the message names it, with a suggestion).
        pydantic.ValidationError: a value the schema refuses (its location names the key).
    """
    from rlctl.config.schema import TrainerConfig, _submodel

    data: dict[str, Any] = base.model_dump() if base is not None else {}
    for key, value in {**(overrides or {}), **kw}.items():
        model: Any = TrainerConfig
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            info = model.model_fields.get(part)
            sub = _submodel(info.annotation) if info is not None else None
            last = i == len(parts) - 1
            if info is None or (sub is None) != last:
                names = list(model.model_fields)
                hint = difflib.get_close_matches(part, names, n=1)
                where = "trainer." + ".".join(parts[:i + 1])
                what = "a section, not a leaf" if info is not None and last else (
                    "a leaf, not a section" if info is not None else "not a key of the trainer section")
                raise KeyError(f"{where}: {what}" + (f"; did you mean {hint[0]!r}?" if info is None and hint else ""))
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                model = sub
    return TrainerConfig.model_validate(data)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a test's process-group rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, rank_args: list[tuple], timeout_s: float) -> dict:
    """Run ``target(*args, queue)`` in one spawned process per entry of ``rank_args`` (e.g. the gloo ranks of
    a 2-rank FSDP2 test) and collect what each puts on the queue as a ``(key, value)`` pair.

    Args:
        target: a module-level function (spawn pickles it by reference).
        rank_args: one argument tuple per process.
        timeout_s: seconds to wait for each result (a hung collective fails the test instead of hanging it).
    Returns:
        ``{key: value}`` of the results.
    Raises:
        queue.Empty: a process put nothing within ``timeout_s``. Every process is joined (60 s), then killed.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, q)) for args in rank_args]
    for p in procs:
        p.start()
    try:
        return dict(q.get(timeout=timeout_s) for _ in procs)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()


def masked_response_logprobs(model: Any, input_ids: Any, attention_mask: Any, response_len: int) -> Any:
    """Response log-probs through right-packed rows WITH the explicit attention mask and position ids
    ``cumsum(mask) - 1`` (the trainer's forward until 2026-12-07), from full-vocabulary fp32 logits (a reference
    for checks: memory is no concern).

    Args:
        model: a Hugging Face causal LM.
        input_ids, attention_mask: [N, P+T] (left-padded prompt, right-padded response), on the model's device.
        response_len: T.
    Returns:
        [N, T] float32: position t is the log-prob of ``input_ids[:, P + t]`` (differentiable).
    """
    import torch

    length, t = input_ids.shape[1], response_len
    left = (attention_mask[:, :length - t] == 0).sum(1)
    cols = (torch.arange(length, device=input_ids.device)[None, :] + left[:, None]) % length
    ids, mask = input_ids.gather(1, cols), attention_mask.gather(1, cols)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
    idx = (length - t - 1 - left)[:, None] + torch.arange(t, device=input_ids.device)[None, :]
    pick = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
    return torch.log_softmax(pick, -1).gather(-1, input_ids[:, length - t:, None])[..., 0]


def trainer_response_logprobs(model: Any, input_ids: Any, attention_mask: Any, response_len: int) -> Any:
    """:func:`rlctl.trainer.response_logprobs_forward` at temperature 1, log-probs only ([N, T] float32), with the
    signature of :func:`masked_response_logprobs`."""
    from rlctl.trainer import response_logprobs_forward

    return response_logprobs_forward(model, input_ids, attention_mask, response_len, 1.0)[0]


def logprob_loss_gradient(model: Any, logprobs_fn: Any, input_ids: Any, attention_mask: Any, response_mask: Any,
                          advantages: Any, ctx: Any) -> tuple[Any, Any]:
    """Gradient of a GRPO-like loss, ``-sum(advantages[:, None] * logp * response_mask) / response tokens``, with
    ``logp = logprobs_fn(model, input_ids, attention_mask, T)`` computed (forward and backward) inside ``ctx``.

    Args:
        model: a Hugging Face causal LM (its gradients are reset first).
        logprobs_fn: :func:`masked_response_logprobs` or :func:`trainer_response_logprobs`.
        input_ids, attention_mask: [N, P+T]; response_mask: [N, T]; advantages: [N] (the model's device).
        ctx: a context manager, e.g. ``torch.nn.attention.sdpa_kernel([...])``.
    Returns:
        ``(gradient, logp)``: every parameter's gradient flattened into one fp32 vector, and the log-probs [N, T]
        fp32 (detached).
    """
    import torch

    model.zero_grad(set_to_none=True)
    with ctx:
        logp = logprobs_fn(model, input_ids, attention_mask, response_mask.shape[1])
        (-(advantages[:, None] * logp * response_mask).sum() / response_mask.sum()).backward()
    grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return grad, logp.detach().float()


def gradient_error(model: Any, logprobs_fn: Any, ctx: Any, input_ids: Any, attention_mask: Any, response_mask: Any,
                   advantages: Any, reference: tuple[Any, Any]) -> dict[str, Any]:
    """:func:`logprob_loss_gradient` of ``model`` against ``reference`` (its ``(gradient, logp)`` from a reference
    model of the same architecture): ``cos`` (cosine similarity of the gradients, non-finite entries as 0),
    ``rel_err`` (L2 error / reference norm), ``logp_max_err`` (max |log-prob error| over response tokens, nats) and
    ``finite``; or ``{"error": first line}`` when the attention kernels ``ctx`` allows refuse the inputs."""
    import torch

    try:
        grad, logp = logprob_loss_gradient(model, logprobs_fn, input_ids, attention_mask, response_mask, advantages, ctx)
    except RuntimeError as e:  # e.g. "No viable backend for scaled_dot_product_attention"
        return {"error": str(e).splitlines()[0][:200]}
    ref_grad, ref_logp = reference
    finite = bool(torch.isfinite(grad).all())
    grad = torch.nan_to_num(grad)
    return {"cos": float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0)),
            "rel_err": float((grad - ref_grad).norm() / ref_grad.norm()),
            "logp_max_err": float(((logp - ref_logp) * response_mask).abs().max()), "finite": finite}
