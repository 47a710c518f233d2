"""Closed-form gradient of the logits, written in place of (or beside) a logits chunk.

For z = logits * inv_tau, d = z - lse = log p and upstream scalars per row (g_y for log p_y, g_H
for the entropy, folded into a = -g_y - sum_c g_c - g_H H and b = -g_H, using E_p[d] = -H):

    dL/dlogits_j = inv_tau * (p_j (a + b d_j) + g_y [j == y])

Why d and not z: the entropy is all a row needs (no E_p[z]), and the cancellation in the entropy
term p_j g_H (E_p[d] - d_j) happens at the scale of log p, not of z (|z| ~ 50 with a bias-like
weight column). Callers pass the lse of these very logits, so the p_j sum to one.

Control-token terms (g_c [j == c]) are added by the caller on K columns. The kernel is purely
elementwise over (row, vocabulary tile), so its grid covers both and it reads each logit once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_grad_kernel(
    LOGITS, DZ, LSE, A, B, Y, GY,
    V, stride_row, stride_out, inv_tau, num_col_blocks,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // num_col_blocks).to(tl.int64)
    cols = (pid % num_col_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    z = tl.load(LOGITS + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_tau
    lse = tl.load(LSE + row)
    a = tl.load(A + row)
    b = tl.load(B + row)
    y = tl.load(Y + row)
    g_y = tl.load(GY + row)
    d = z - lse
    p = tl.exp(d)
    dz = p * (a + b * d) + tl.where(cols == y, g_y, 0.0)
    tl.store(DZ + row * stride_out + cols, (dz * inv_tau).to(DZ.dtype.element_ty), mask=mask)


def logits_grad(logits: torch.Tensor, lse, a, b, targets, g_y, inv_tau: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dlogits [n, V] in out's dtype (default: logits' dtype; out may be logits itself)."""
    n, v = logits.shape
    assert logits.stride(1) == 1
    out = torch.empty_like(logits) if out is None else out
    block_v = 2048 if logits.is_cuda else 256
    num_col_blocks = triton.cdiv(v, block_v)
    _logits_grad_kernel[(n * num_col_blocks,)](
        logits, out, lse, a, b, targets, g_y,
        v, logits.stride(0), out.stride(0), float(inv_tau), num_col_blocks,
        BLOCK_V=block_v, num_warps=8 if logits.is_cuda else 1,
    )
    return out
