"""Padding-free micro-batches for the trainer: token-budget micro-batch plans and the packed forward.

Two independent knobs (``trainer.*`` keys, SkyRL names):

* ``max_tokens_per_microbatch`` (:func:`plan_micro_batches`): instead of a fixed number of sequences,
  a micro-batch takes sequences (sorted by real length) until the next one would push its real tokens
  (prompt + response, padding excluded) past the budget; a sequence longer than the budget runs alone.
  Different ranks may then plan different numbers of micro-batches, but FSDP2's forward all-gathers and
  backward reduce-scatters are collectives: every rank must run the SAME number of forward (and
  backward) passes. The trainer all-reduces the count (MAX) and pads with :func:`empty_micro_batch`
  micro-batches: one 2-token sequence (1 prompt + 1 response token) whose ``response_mask`` is 0, so it
  runs the full forward/backward (same collectives) and adds exactly 0 to the loss and gradients.
* ``remove_microbatch_padding`` (:func:`packed_logprobs_forward`): the sequences of a micro-batch are
  concatenated into ONE row ``[1, S]`` (S = sum of real lengths, no padding) with per-sequence position
  ids ``0..len_i-1``, and the model is called with ``attention_mask=None``. transformers (>= 4.53, 5.x
  included) then detects the packing in ``masking_utils._preprocess_mask_arguments`` ->
  ``find_packed_sequence_indices`` (a new sequence starts wherever the position id does not grow by 1)
  and builds a block-diagonal causal mask for sdpa / eager / flex_attention
  (``packed_sequence_mask_function``). No flash-attn package is needed. Checked in transformers 5.25.0
  (installed on the CPU machine) and in a stored 5.x ``masking_utils.py`` (huggingface/transformers
  commit 00c4411c); the GPU kit's 5.12.1 lies between them. :func:`check_packing_support` refuses
  attention implementations and transformers versions without this path instead of silently letting
  sequences attend to each other.

  As in :func:`rlctl.trainer.response_logprobs_forward`, a forward pre-hook on the LM head picks the
  hidden states that predict response tokens ([1, M, H], M = real response tokens of the micro-batch)
  and the head's forward is replaced by :func:`rlctl.logprobs.linear_logprobs`, so only response
  positions reach the chunked log-prob head; the M values are scattered back to the [n, T] layout.

Test: ``pytest tests/unit/test_packing.py`` (plans, packing layout, packed == padded log-probs with
sdpa and eager, gradients independent of the split on 1 and 2 gloo ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Attention implementations whose transformers mask builder turns packed position ids into a
#: block-diagonal causal mask (flash-attention kernels also handle packing, but the GPU kit has no
#: flash-attn package and this path was not checked with them).
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


def plan_micro_batches(lengths: torch.Tensor, size: int, max_tokens: int | None,
                       widths: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Split sequences into micro-batches of similar length.

    Args:
        lengths: [N] int, real tokens (prompt + response) of each sequence.
        size: sequences per micro-batch (>= 1), used when ``max_tokens`` is None.
        max_tokens: token budget per micro-batch (>= 1) or None. Sequences are taken in length order and
            a micro-batch is closed when the next sequence would push its cost past the budget
            (greedy next-fit); a sequence longer than the budget gets a micro-batch of its own.
        widths: ``(prompt_lengths [N], response_lengths [N])`` for the padded forward: a micro-batch's cost is then
            the size it has after :func:`rlctl.trainer.trim_padding`, ``n x (longest prompt + longest response)``
            tokens, padding included. None (the packed forward): its real tokens.
    Returns:
        Index tensors [n_i] int64 into ``lengths``, in ascending length order (stable sort), covering
        every sequence exactly once; empty list for N = 0.
    Raises:
        ValueError: ``size`` or ``max_tokens`` < 1.
    """
    if size < 1:
        raise ValueError(f"plan_micro_batches: size must be >= 1 sequence, got {size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"plan_micro_batches: max_tokens must be >= 1 token, got {max_tokens}")
    order = torch.sort(lengths, stable=True).indices
    if max_tokens is None:
        return [order[s:s + size] for s in range(0, len(order), size)]
    real = lengths.tolist()
    prompt, resp = (widths[0].tolist(), widths[1].clamp(min=1).tolist()) if widths is not None else (None, None)
    plan: list[torch.Tensor] = []
    start, used, p_max, r_max = 0, 0, 0, 0
    for pos, i in enumerate(order.tolist()):
        if prompt is None:
            cost = used + real[i]
        else:  # trim_padding keeps the longest prompt and the longest response (>= 1 column) of the micro-batch
            cost = (pos - start + 1) * (max(p_max, prompt[i]) + max(r_max, resp[i]))
        if pos > start and cost > max_tokens:
            plan.append(order[start:pos])
            start, used, p_max, r_max = pos, 0, 0, 0
        if prompt is None:
            used += real[i]
        else:
            p_max, r_max = max(p_max, prompt[i]), max(r_max, resp[i])
    if len(order) > start:
        plan.append(order[start:])
    return plan


def empty_micro_batch(batch: dict[str, torch.Tensor], response_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A micro-batch that contributes nothing: one sequence of 1 prompt + 1 response token (id 0) whose
    ``response_mask`` is 0, for ranks that run out of micro-batches before the others.

    The loss terms are masked sums over fixed mini-batch denominators (:func:`rlctl.grpo.masked_reduce`),
    so it adds exactly 0 to the loss and its gradients, while its forward and backward run every FSDP2
    collective like a real micro-batch. Log-probs, old/ref log-probs and advantages are 0 (finite).

    Args:
        batch: a batch in the trainer's layout (only keys, dtypes and trailing shapes are used).
        response_keys: keys of [N, T] per-response-token tensors (become [1, 1] zeros).
    Returns:
        ``input_ids`` / ``attention_mask`` [1, 2] (ids 0, mask 1), response tensors [1, 1] zeros, other
        tensors ``[1, *trailing]`` zeros.
    """
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            continue
        if k == "input_ids":
            out[k] = torch.zeros(1, 2, dtype=v.dtype)
        elif k == "attention_mask":
            out[k] = torch.ones(1, 2, dtype=v.dtype)
        elif k in response_keys:
            out[k] = torch.zeros(1, 1, dtype=v.dtype)
        else:
            out[k] = torch.zeros(1, *v.shape[1:], dtype=v.dtype)
    return out


def computed_tokens(mb: dict[str, torch.Tensor], packed: bool) -> int:
    """Tokens the forward of micro-batch ``mb`` processes: ``sum(attention_mask)`` packed (no padding),
    ``n x width`` of the (trimmed) padded rows otherwise."""
    return int(mb["attention_mask"].sum()) if packed else int(mb["input_ids"].numel())


@dataclass
class PackedRows:
    """One micro-batch packed into a single row (see :func:`pack_rows`).

    ``input_ids`` / ``position_ids`` [1, S]; ``hidden_index`` [M] packed positions whose hidden state
    predicts a response token; ``labels`` [M] those tokens; ``rows`` / ``cols`` [M] where each lands in the
    [n, T] response layout (row-major order).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    hidden_index: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int, caller: str = "pack_rows") -> PackedRows:
    """Concatenate the real tokens of each row (prompt then response) into one padding-free row.

    Args:
        input_ids, attention_mask: [n, P+T], left-padded prompts and right-padded responses (the trainer's
            batch layout); real tokens of a row are contiguous.
        response_len: T.
        caller: prefix of error messages.
    Returns:
        :class:`PackedRows`; row i occupies packed positions ``[start_i, start_i + len_i)`` with position
        ids ``0..len_i-1``; response token j of row i (column P + j, j < its response length) sits at
        ``start_i + prompt_len_i + j`` and is predicted by the hidden state one position earlier.
    Raises:
        ValueError: a row has an empty prompt.
    """
    n, length = input_ids.shape
    p = length - response_len
    real = attention_mask.bool()
    prompt_lens = real[:, :p].sum(1)  # [n]
    if n and int(prompt_lens.min()) == 0:
        raise ValueError(f"{caller}: a row has an empty prompt (no token before its response)")
    resp_lens = real[:, p:].sum(1)  # [n]
    lengths = prompt_lens + resp_lens
    starts = lengths.cumsum(0) - lengths  # [n]
    ids = input_ids[real][None]  # row-major: row 0's tokens, then row 1's, ...
    pos = (real.long().cumsum(1) - 1)[real][None]
    valid = torch.arange(response_len, device=input_ids.device)[None, :] < resp_lens[:, None]  # [n, T]
    rows, cols = valid.nonzero(as_tuple=True)
    hidden_index = starts[rows] + prompt_lens[rows] - 1 + cols
    return PackedRows(ids, pos, hidden_index, input_ids[rows, p + cols], rows, cols)


def check_packing_support(model: torch.nn.Module) -> None:
    """Refuse a model whose forward would not turn packed position ids into a block-diagonal mask.

    Raises:
        ValueError: the model's ``config._attn_implementation`` is not one of :data:`PACKED_ATTENTION`.
        RuntimeError: the installed transformers has no ``masking_utils.find_packed_sequence_indices``.
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        raise ValueError(f"trainer.remove_microbatch_padding=true needs attention implementation "
                         f"{' / '.join(PACKED_ATTENTION)}; the model uses {impl!r}: set "
                         "trainer.remove_microbatch_padding=false")
    import transformers.masking_utils as mu

    if not hasattr(mu, "find_packed_sequence_indices"):
        raise RuntimeError("trainer.remove_microbatch_padding=true needs transformers >= 4.53 (packed-sequence "
                           "masks from position_ids); upgrade transformers or set trainer.remove_microbatch_padding=false")


def packed_logprobs_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            response_len: int, temperature: float, *, with_entropy: bool = False,
                            entropy_grad: bool = False,
                            chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`rlctl.trainer.response_logprobs_forward` without padding: the rows are packed into one
    ``[1, S]`` row (:func:`pack_rows`), run with ``attention_mask=None`` and per-sequence position ids
    (block-diagonal causal attention, see the module docstring), and only the M hidden states that
    predict response tokens reach the chunked log-prob head.

    Args:
        model: a Hugging Face causal LM (see ``response_logprobs_forward``) with an attention
            implementation in :data:`PACKED_ATTENTION`.
        input_ids, attention_mask: [n, P+T] (left-padded prompt, right-padded response).
        response_len: T.
        temperature: logits are divided by it; 0 means 1.
        with_entropy, entropy_grad, chunk_size: as ``response_logprobs_forward``.
    Returns:
        ``(logp, entropy)``: [n, T] float32 (entropy None without ``with_entropy``); position t is the
        log-prob of ``input_ids[:, P + t]``; 0 at response padding (where ``attention_mask`` is 0).
    Raises:
        ValueError: empty prompt, no LM head or no 2-D head weight, unsupported attention implementation.
        RuntimeError: the model did not return the head's output as its ``logits``; transformers too old.
    """
    from rlctl.logprobs import CHUNK_POSITIONS, head_replaced, linear_logprobs

    caller = "packed_logprobs_forward"
    n, t = input_ids.shape[0], response_len
    packed = pack_rows(input_ids, attention_mask, t, caller)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{caller}: {type(model).__name__} has no output embedding (LM head)")
    check_packing_support(model)
    s, m = packed.input_ids.shape[1], packed.hidden_index.numel()
    keep = s - int(packed.hidden_index.min()) if m else 1  # only the last `keep` positions reach the head
    index = packed.hidden_index - (s - keep)
    width = 2 if with_entropy else 1
    chunk = CHUNK_POSITIONS if chunk_size is None else chunk_size

    def pick(_module, args):
        hidden = args[0]  # [1, keep, H]
        if hidden.shape[1] != keep:
            raise RuntimeError(f"{caller}: the LM head got {hidden.shape[1]} positions, not the {keep} asked for "
                               "with logits_to_keep")
        return (hidden[:, index.to(hidden.device)], *args[1:])

    def head_forward(head, hidden):  # [1, M, H] -> [1, M, width]
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{caller}: the LM head {type(head).__name__} has no 2-D weight "
                             "(only linear heads are supported)")
        logp, ent = linear_logprobs(hidden, weight, packed.labels[None].to(hidden.device), bias=getattr(head, "bias", None),
                                    temperature=temperature, with_entropy=with_entropy,
                                    entropy_grad=entropy_grad, chunk_size=chunk)
        return torch.stack((logp, ent) if ent is not None else (logp,), -1)

    with head_replaced(head, pick, head_forward):
        out = model(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids,
                    use_cache=False, logits_to_keep=keep)
    logits = out.logits
    if tuple(logits.shape) != (1, m, width):
        raise RuntimeError(f"{caller}: the LM head gave logits of shape {tuple(logits.shape)}, expected "
                           f"(1, {m}, {width}): {type(model).__name__} does not call get_output_embeddings() "
                           "on the final hidden states")
    flat = logits[0]  # [M, width]
    rows, cols = packed.rows.to(flat.device), packed.cols.to(flat.device)
    grid = flat.new_zeros(n, t, width).index_put((rows, cols), flat)  # differentiable scatter
    logp = grid[..., 0]
    if not with_entropy:
        return logp, None
    return logp, (grid[..., 1] if entropy_grad else grid[..., 1].detach())
