"""Per-row softmax statistics of a materialised logits chunk [n, V] (the policy-loss path, which
keeps one bounded token chunk of logits to form gradients in the same call).

One program per row walks the vocabulary in BLOCK_V tiles with the online (m, s, u) update of
kernels/linear_token_stats.py and returns lse, entropy and z_target of z = logits * inv_tau.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_row_stats_kernel(
    LOGITS, Y, LSE, ENT, ZY,
    V, stride_row, inv_tau,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    y = tl.load(Y + row)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)   # per-lane running stats, merged at the end
    s = tl.zeros([BLOCK_V], tl.float32)
    u = tl.zeros([BLOCK_V], tl.float32)
    zy = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, z)
        # Lanes that have seen no column yet (m_new == -inf) stay at s = u = 0.
        live = m_new > float("-inf")
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        valid = mask & live
        d = tl.where(valid, z - m_new, 0.0)
        e = tl.where(valid, tl.exp(d), 0.0)
        alpha = tl.where(live, tl.exp(shift), 0.0)
        u = alpha * (u + shift * s) + e * d
        s = alpha * s + e
        m = m_new
        zy += tl.where(cols == y, z, 0.0)
    # Merge the BLOCK_V lanes with the same rescaling rule.
    m_row = tl.max(m, axis=0)
    lane_live = m > float("-inf")
    shift = tl.where(lane_live, m - m_row, 0.0)
    alpha = tl.where(lane_live, tl.exp(shift), 0.0)
    s_row = tl.sum(alpha * s, axis=0)
    u_row = tl.sum(alpha * (u + shift * s), axis=0)
    log_s = tl.log(s_row)
    tl.store(LSE + row, m_row + log_s)
    tl.store(ENT + row, log_s - u_row / s_row)
    tl.store(ZY + row, tl.sum(zy, axis=0))


def softmax_row_stats(logits: torch.Tensor, targets: torch.Tensor, inv_tau: float,
                      block_v: int | None = None, num_warps: int | None = None):
    """lse, entropy, z_target (fp32 [n]) of z = logits * inv_tau; logits [n, V] row-major."""
    n, v = logits.shape
    assert logits.stride(1) == 1
    out = torch.empty((3, n), device=logits.device, dtype=torch.float32)
    block_v = block_v or (1024 if logits.is_cuda else 256)
    _softmax_row_stats_kernel[(n,)](
        logits, targets, out[0], out[1], out[2],
        v, logits.stride(0), float(inv_tau),
        BLOCK_V=block_v, num_warps=num_warps or (4 if logits.is_cuda else 1),
    )
    return out[0], out[1], out[2]
