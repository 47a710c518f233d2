"""Running a Hugging Face causal LM on a packed batch without attention across sequences.

Sequences packed into one row must each see only their own past. Two ways, by attention
implementation:
- flash-attn (`flash_attention_2/3`, GPU): the varlen kernel gets `cu_seq_lens_*` and per-sequence
  position ids; nothing of size T x T is built.
- eager / sdpa (CPU, or GPU without flash-attn), two layouts:
  "padded": the sequences become rows of a right-padded [B, L] batch with a padding mask, and the
  hidden states are gathered back into packed order. Attention costs sum(B * L^2) instead of
  T^2: with first-fit-decreasing packs of similar lengths this is several times less work.
  "block_mask": one row with an explicit block-diagonal causal mask [1, 1, T, T], which
  transformers passes through unchanged (T^2 memory and work). "auto" takes "padded" unless
  padding would more than double the tokens (one long sequence beside many short ones).
Position ids restart at 0 for every sequence, so rotary embeddings match unpacked forwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedOutput:
    hidden_states: torch.Tensor        # [T, hidden], last layer after the final norm (LM-head input)
    logits: torch.Tensor | None = None  # [T, vocab] when asked for


def block_causal_mask(cu_seqlens: torch.Tensor, dtype: torch.dtype | None = None,
                      device=None) -> torch.Tensor:
    """[1, 1, T, T] mask letting token i attend token j iff both are in one sequence and j <= i.
    Boolean (True = attend) when `dtype` is None, else additive (0 / dtype's min)."""
    cu = torch.as_tensor(cu_seqlens, device=device).long()
    total = int(cu[-1])
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu.diff())
    pos = torch.arange(total, device=cu.device)
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    if dtype is None:
        return allowed[None, None]
    mask = torch.zeros(total, total, dtype=dtype, device=cu.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


LAYOUTS = ("auto", "padded", "block_mask")


def packed_forward(model, input_ids, position_ids, cu_seqlens, *, return_logits: bool = False,
                   return_hidden: bool = True, layout: str = "auto") -> PackedOutput:
    """Forward a packed batch (flat [T] tensors, e.g. from `PackedBatch.to_torch()`).

    Returns the last hidden states (what the LM head / a fused linear-loss kernel consumes)
    and, with `return_logits`, the logits. `model` is a `*ForCausalLM` (e.g. Qwen2ForCausalLM).
    """
    device = next(model.parameters()).device
    input_ids = torch.as_tensor(input_ids, device=device).long().reshape(1, -1)
    position_ids = torch.as_tensor(position_ids, device=device).long().reshape(1, -1)
    cu = torch.as_tensor(cu_seqlens, device=device).to(torch.int32)
    if int(cu[-1]) != input_ids.shape[1]:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but there are "
                         f"{input_ids.shape[1]} tokens")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    lengths = cu.diff().long()
    rows, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    if layout == "auto":
        layout = "padded" if rows * width <= 2 * input_ids.shape[1] else "block_mask"
    if attn.startswith("flash_attention"):
        out = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=width,
                               max_length_k=width)
        hidden = out.last_hidden_state[0]
    elif layout == "padded":
        # Row r, column c of the padded batch holds packed token cu[r] + c.
        row = torch.repeat_interleave(torch.arange(rows, device=device), lengths)
        col = torch.arange(input_ids.shape[1], device=device) - cu.long()[row]
        ids = input_ids.new_zeros(rows, width)
        pos = position_ids.new_zeros(rows, width)
        keep = torch.zeros(rows, width, dtype=torch.long, device=device)
        ids[row, col], pos[row, col], keep[row, col] = input_ids[0], position_ids[0], 1
        out = model.base_model(input_ids=ids, attention_mask=keep, position_ids=pos, use_cache=False)
        hidden = out.last_hidden_state[row, col]
    else:
        # sdpa takes a boolean mask; eager and others add an additive one to the scores.
        mask = block_causal_mask(cu, dtype=None if attn == "sdpa" else model.dtype, device=device)
        out = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                               use_cache=False)
        hidden = out.last_hidden_state[0]
    logits = model.get_output_embeddings()(hidden) if return_logits else None
    return PackedOutput(hidden_states=hidden if return_hidden else None, logits=logits)
