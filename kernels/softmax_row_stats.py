"""Per-row softmax statistics of a materialised logits chunk [n, V] (the forward of the gemm_chunks
path and the policy-loss path, which keep one bounded token chunk of logits at a time).

Returns lse, entropy and z_target of z = logits * inv_tau. Each row's vocabulary is split into
SPLIT segments, one program per (row, segment): a chunk has only ~1-2k rows, and with one program
per row the GPU held too few of them to keep its memory busy (2.6 ms for a 5 GB read that needs
~1.1 ms on an H200). Each program keeps per-lane running stats over its segment

    m = max z,   s = sum exp(z - m),   u = sum exp(z - m) (z - m)

and a second, tiny kernel merges the segments of a row with the same rescaling rule
(s' = a s, u' = a (u + (m - m') s), a = exp(m - m')); then lse = m + log s, H = log s - u / s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_stats_kernel(
    LOGITS, Y, PART,
    V, SEG, SPLIT, stride_row, inv_tau,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    base = LOGITS + row * stride_row
    y = tl.load(Y + row)
    lo = seg * SEG
    hi = tl.minimum(lo + SEG, V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    u = tl.zeros([BLOCK_V], tl.float32)
    zy = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < hi
        z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
        z = tl.where(mask, z, float("-inf"))
        # One exp per element: of m and z, the larger becomes the new max, so one of exp(m - m_new)
        # and exp(z - m_new) is 1 and the other is t = exp(-|z - m|).
        grow = z > m
        t = tl.exp(tl.where(grow, m - z, z - m))
        t = tl.where(mask & (m > float("-inf")), t, 0.0)   # nothing seen yet, or a padding column
        m_new = tl.where(grow, z, m)
        shift = tl.where(grow & (s > 0), m - z, 0.0)       # log of the rescale, 0 if no rescale
        alpha = tl.where(grow, t, 1.0)
        e = tl.where(mask, tl.where(grow, 1.0, t), 0.0)
        d = tl.where(grow, 0.0, z - m)                     # z - m_new; 0 where z is the new max
        d = tl.where(mask & (e > 0), d, 0.0)
        u = alpha * (u + shift * s) + e * d
        s = alpha * s + e
        m = m_new
        zy += tl.where(mask & (cols == y), z, 0.0)
    # Merge the lanes; lanes that saw no column (m = -inf) drop out.
    m_seg = tl.max(m, axis=0)
    live = m > float("-inf")
    shift = tl.where(live, m - m_seg, 0.0)
    alpha = tl.where(live, tl.exp(shift), 0.0)
    out = PART + (row * SPLIT + seg) * 4
    tl.store(out + 0, m_seg)
    tl.store(out + 1, tl.sum(alpha * s, axis=0))
    tl.store(out + 2, tl.sum(alpha * (u + shift * s), axis=0))
    tl.store(out + 3, tl.sum(zy, axis=0))


@triton.jit
def _merge_segments_kernel(PART, LSE, ENT, ZY, SPLIT, SPLIT_P2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, SPLIT_P2)
    mask = k < SPLIT
    base = PART + (row * SPLIT + k) * 4
    m = tl.load(base + 0, mask=mask, other=float("-inf"))
    s = tl.load(base + 1, mask=mask, other=0.0)
    u = tl.load(base + 2, mask=mask, other=0.0)
    zy = tl.load(base + 3, mask=mask, other=0.0)
    m_row = tl.max(m, axis=0)
    shift = tl.where(mask, m - m_row, 0.0)
    alpha = tl.where(mask, tl.exp(shift), 0.0)
    s_row = tl.sum(alpha * s, axis=0)
    u_row = tl.sum(alpha * (u + shift * s), axis=0)
    log_s = tl.log(s_row)
    tl.store(LSE + row, m_row + log_s)
    tl.store(ENT + row, log_s - u_row / s_row)
    tl.store(ZY + row, tl.sum(zy, axis=0))


def default_split(n: int, v: int, block_v: int) -> int:
    """Segments per row: enough programs to fill an H100/H200 (~8k) while every segment keeps at
    least 8 vocabulary tiles of work."""
    by_rows = triton.next_power_of_2(max(1, -(-8192 // max(n, 1))))
    by_vocab = max(1, v // (8 * block_v))
    return max(1, min(16, by_rows, by_vocab))


def softmax_row_stats(logits: torch.Tensor, targets: torch.Tensor, inv_tau: float,
                      block_v: int | None = None, num_warps: int | None = None,
                      split: int | None = None):
    """lse, entropy, z_target (fp32 [n]) of z = logits * inv_tau; logits [n, V] row-major."""
    n, v = logits.shape
    assert logits.stride(1) == 1
    out = torch.empty((3, n), device=logits.device, dtype=torch.float32)
    if n == 0:
        return out[0], out[1], out[2]
    block_v = block_v or (1024 if logits.is_cuda else 256)
    split = split or default_split(n, v, block_v)
    # Segments of whole tiles; with split > cdiv(V, block_v) some would be empty, so cap it.
    seg = triton.cdiv(triton.cdiv(v, split), block_v) * block_v
    split = triton.cdiv(v, seg)
    part = torch.empty((n, split, 4), device=logits.device, dtype=torch.float32)
    _segment_stats_kernel[(n, split)](
        logits, targets, part,
        v, seg, split, logits.stride(0), float(inv_tau),
        BLOCK_V=block_v, num_warps=num_warps or (4 if logits.is_cuda else 1),
    )
    _merge_segments_kernel[(n,)](part, out[0], out[1], out[2], split,
                                 SPLIT_P2=triton.next_power_of_2(split), num_warps=1)
    return out[0], out[1], out[2]
