"""Per-token log-probs, entropy and control-token log-probs straight from hidden states.

    z = hidden @ weight^T / temperature,   p = softmax(z)
    logprobs[i]            = log p[i, targets[i]]
    entropy[i]             = -sum_j p[i, j] log p[i, j]
    control_logprobs[i, k] = log p[i, control_ids[k]]
    lse[i]                 = logsumexp_j z[i, j]

Never materialises the [N, V] logits. Forward: the fused Triton kernel (GPU, or CPU under
TRITON_INTERPRET=1) or token chunks of logits on the torch backend. Backward recomputes logits
chunk by chunk (workspace-bounded), takes each chunk's lse from those logits, and applies the
closed-form logit gradient dz = p (a + b log p) + sparse terms, which needs only the entropy per
row from the forward.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Sequence

import torch

DEFAULT_WORKSPACE_BYTES = 1 << 30


class TokenStats(NamedTuple):
    logprobs: torch.Tensor          # [N] fp32, 0 at ignored rows
    entropy: torch.Tensor           # [N] fp32, 0 at ignored rows
    control_logprobs: torch.Tensor  # [N, K] fp32, 0 at ignored rows
    lse: torch.Tensor               # [N] fp32, 0 at ignored rows (not differentiable)


# --------------------------------------------------------------------------------------------
# Input checks: every error names the offending argument and item.
# --------------------------------------------------------------------------------------------

def check_linear_inputs(hidden, weight, targets, active=None) -> None:
    """Shapes, dtypes, devices, and targets in [0, V) at active rows (default: all rows)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D tensor [N, H], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [V, H], got {getattr(weight, 'shape', type(weight))}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H]={tuple(hidden.shape)} and weight [V, H]={tuple(weight.shape)} "
                         "disagree on H")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got hidden {hidden.dtype} "
                         f"and weight {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.dtype.is_floating_point \
            or targets.dtype == torch.bool:
        raise ValueError(f"targets must be a 1-D integer tensor, got "
                         f"{getattr(targets, 'dtype', type(targets))} {tuple(getattr(targets, 'shape', ()))}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries but hidden has {hidden.shape[0]} rows")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    vocab = weight.shape[0]
    bad = (targets < 0) | (targets >= vocab)
    if active is not None:
        bad &= active
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside the vocabulary [0, {vocab})")


def as_control_ids(control_ids, vocab: int, device) -> torch.Tensor:
    """Control-token ids as an int64 tensor; unique, each in [0, V)."""
    if control_ids is None or len(control_ids) == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    ids = torch.as_tensor(control_ids, device=device)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"control_ids must be a 1-D list of integer token ids, got {control_ids!r}")
    ids = ids.long()
    for k, c in enumerate(ids.tolist()):
        if not 0 <= c < vocab:
            raise ValueError(f"control_ids[{k}] = {c} is outside the vocabulary [0, {vocab})")
    if len(set(ids.tolist())) != ids.numel():
        raise ValueError(f"control_ids has duplicates: {ids.tolist()}")
    return ids


def check_temperature(temperature) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    return t


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before "
                           "importing fastrl) to run the kernels on CPU tensors in the interpreter")
    return backend


# --------------------------------------------------------------------------------------------
# Building blocks shared with fastrl.ops.linear_policy_loss: one home for the maths.
# --------------------------------------------------------------------------------------------

def logits_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T with fp32 output (fp32 accumulation for bf16/fp16 inputs too)."""
    if x.dtype == torch.float32:
        return x @ w.T
    if x.is_cuda:
        try:
            return torch.mm(x, w.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            return (x @ w.T).float()
    return x.float() @ w.float().T


def weight_grad_buffer(weight: torch.Tensor, workspace_bytes: int) -> torch.Tensor:
    """Zeroed accumulator for dW across token chunks.

    fp32 when the weight is fp32, or when an fp32 copy fits in half the workspace (small vocab x
    hidden). Otherwise (a 152k x 4096 bf16 head: a 2.5 GB fp32 copy) it is the weight's own dtype:
    each chunk's GEMM still accumulates in fp32 inside cuBLAS and rounds once when added, so a
    batch of c chunks rounds c times, the price of keeping the workspace bound.
    """
    fp32_bytes = weight.numel() * 4
    dtype = torch.float32 if (weight.dtype == torch.float32 or fp32_bytes <= workspace_bytes // 2) \
        else weight.dtype
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device)


def chunk_workspace(weight: torch.Tensor, dw_buffer: torch.Tensor | None, workspace_bytes: int) -> int:
    """What is left of the workspace for logits chunks once an extra fp32 dW buffer is taken, less
    1/16 for the per-row vectors and the GEMM library's own workspace."""
    if dw_buffer is not None and dw_buffer.dtype != weight.dtype:
        workspace_bytes -= dw_buffer.numel() * dw_buffer.element_size()
    return workspace_bytes - workspace_bytes // 16


def accumulate_weight_grad(dw: torch.Tensor, dz: torch.Tensor, x: torch.Tensor) -> None:
    """dw += dz^T @ x with fp32 accumulation inside the product; dw fp32 or dz's dtype."""
    if dw.dtype == dz.dtype:
        dw.addmm_(dz.T, x)          # cuBLAS/CPU accumulate in fp32, one rounding per chunk
        return
    if dz.is_cuda:
        try:
            torch.addmm(dw, dz.T, x, out_dtype=torch.float32, out=dw)
            return
        except (TypeError, RuntimeError):
            warnings.warn("torch.addmm(out_dtype=float32) unavailable: dW rounds once per chunk",
                          stacklevel=2)
            dw += (dz.T @ x).float()
            return
    dw.addmm_(dz.T.float(), x.float())


def rows_per_chunk(vocab: int, bytes_per_logit: int, workspace_bytes: int) -> int:
    if workspace_bytes < vocab * bytes_per_logit:
        raise ValueError(f"workspace_bytes={workspace_bytes} cannot hold one row of logits "
                         f"({vocab} x {bytes_per_logit} bytes)")
    return workspace_bytes // (vocab * bytes_per_logit)


def softmax_row_stats(logits32, targets, inv_tau: float, backend: str):
    """lse, entropy, z_target of z = logits * inv_tau, per row of a logits chunk."""
    if backend == "triton":
        from fastrl.kernels.softmax_row_stats import softmax_row_stats as kernel

        return kernel(logits32, targets.contiguous(), inv_tau)
    z = logits32 * inv_tau
    lse = torch.logsumexp(z, dim=1)
    logp = z - lse[:, None]
    entropy = -(logp.exp() * logp).sum(dim=1)
    return lse, entropy, z.gather(1, targets[:, None])[:, 0]


def logits_grad(logits32, lse, a, b, targets, g_y, inv_tau: float, out_dtype, backend: str):
    """dL/dlogits = inv_tau (p (a + b (z - lse)) + g_y [j == y]) in out_dtype (in place when fp32)."""
    if backend == "triton":
        from fastrl.kernels.logits_grad import logits_grad as kernel

        out = logits32 if out_dtype == torch.float32 else torch.empty_like(logits32, dtype=out_dtype)
        rows = [t.contiguous() for t in (lse, a, b, targets, g_y)]  # the kernel reads them with stride 1
        return kernel(logits32, *rows, inv_tau, out=out)
    d = logits32 * inv_tau - lse[:, None]
    dz = torch.exp(d) * (a[:, None] + b[:, None] * d)
    dz.scatter_add_(1, targets[:, None], g_y[:, None])
    return (dz * inv_tau).to(out_dtype)


def linear_grads_from_upstream(hidden, weight, targets, control_ids, inv_tau, entropy,
                               g_y, g_h, g_c, backend, workspace_bytes, need_dx=True, need_dw=True):
    """dX, dW of a loss with upstream g_y (log p_y), g_h (entropy), g_c [n, K] (log p_c).

    Recomputes logits in token chunks bounded by workspace_bytes; dX rows are written per chunk,
    dW accumulates in fp32. Each chunk's lse comes from those very logits, not from the forward:
    the p_j must sum to one over the vocabulary, else a bias-like weight column (|w| ~ 25) turns
    the forward/backward GEMM rounding gap (~1 ulp of lse) into dX errors of up to 7e-4 of the
    largest gradient. The forward's entropy is accurate enough (measured: no change when it too
    is recomputed).
    """
    n = hidden.shape[0]
    vocab = weight.shape[0]
    dx = torch.empty_like(hidden) if need_dx else None
    dw_acc = weight_grad_buffer(weight, workspace_bytes) if need_dw else None
    if n == 0:
        return dx, (dw_acc.to(weight.dtype) if need_dw else None)
    extra = 0 if hidden.dtype == torch.float32 else hidden.element_size()
    # torch: one more fp32 chunk buffer (logits * inv_tau for the logsumexp); Triton reads in place.
    per_logit = (4 if backend == "triton" else 8) + extra
    rows = rows_per_chunk(vocab, per_logit, chunk_workspace(weight, dw_acc, workspace_bytes))
    a_all = -g_h * entropy - g_y - (g_c.sum(dim=1) if g_c.numel() else 0.0)
    b_all = -g_h
    for start in range(0, n, rows):
        end = min(start + rows, n)
        x = hidden[start:end]
        logits = logits_fp32(x, weight)
        if backend == "triton":
            lse = softmax_row_stats(logits, targets[start:end], inv_tau, backend)[0]
        else:
            lse = torch.logsumexp(logits * inv_tau, dim=1)
        dz = logits_grad(logits, lse, a_all[start:end], b_all[start:end],
                         targets[start:end], g_y[start:end], inv_tau, hidden.dtype, backend)
        if control_ids.numel():
            dz[:, control_ids] += (g_c[start:end] * inv_tau).to(dz.dtype)
        if need_dx:
            torch.mm(dz, weight, out=dx[start:end])
        if need_dw:
            accumulate_weight_grad(dw_acc, dz, x)
        del logits, dz
    return dx, (dw_acc.to(weight.dtype) if need_dw else None)


# How the triton backend forms the forward statistics. "fused": the one Triton kernel of
# kernels/linear_token_stats.py, which never writes a logit. "gemm_chunks": the GEMM library
# (cuBLAS) writes fp32 logits of one token chunk at a time (bounded by the workspace) and the
# Triton row-stats kernel reads each chunk once. bench/kernels.py times both side by side and its
# JSON records which one was the default; the tests run both. On an H200 (bf16, N=8192, H=4096,
# V=151936) gemm_chunks took 16.7 ms and fused 20.6 ms against 14.5 ms for the bare GEMM
# (bench/results/kernels_nvidia_h200.json): cuBLAS's GEMM outruns Triton's by more than the
# extra pass over the logits costs, so gemm_chunks is the default.
TRITON_FORWARD = "gemm_chunks"


def _forward_stats(hidden, weight, targets, inv_tau, backend, workspace_bytes):
    """lse, entropy, z_target for every row (all targets valid)."""
    if backend == "triton" and TRITON_FORWARD == "fused":
        from fastrl.kernels.linear_token_stats import linear_stats_fwd

        return linear_stats_fwd(hidden, weight, targets, inv_tau)
    n = hidden.shape[0]
    out = torch.empty((3, n), dtype=torch.float32, device=hidden.device)
    rows = rows_per_chunk(weight.shape[0], 4, chunk_workspace(weight, None, workspace_bytes))
    w = weight if (weight.dtype == torch.float32 or weight.is_cuda) else weight.float()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        stats = softmax_row_stats(logits_fp32(hidden[start:end].to(w.dtype), w), targets[start:end],
                                  inv_tau, backend)
        for k in range(3):
            out[k, start:end] = stats[k]
    return out[0], out[1], out[2]


class _LinearTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, control_ids, inv_tau, backend, workspace_bytes):
        lse, entropy, z_target = _forward_stats(hidden, weight, targets, inv_tau, backend, workspace_bytes)
        logprobs = z_target - lse
        if control_ids.numel():
            control_logprobs = logits_fp32(hidden, weight[control_ids]) * inv_tau - lse[:, None]
        else:
            control_logprobs = hidden.new_zeros((hidden.shape[0], 0), dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, targets, control_ids, entropy)
        ctx.inv_tau, ctx.backend, ctx.workspace_bytes = inv_tau, backend, workspace_bytes
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy, control_logprobs, lse

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_ctrl, _g_lse):
        hidden, weight, targets, control_ids, entropy = ctx.saved_tensors
        n = hidden.shape[0]
        zeros = hidden.new_zeros(n, dtype=torch.float32)
        g_y = zeros if g_logp is None else g_logp.float()
        g_h = zeros if g_ent is None else g_ent.float()
        g_c = (hidden.new_zeros((n, control_ids.numel()), dtype=torch.float32) if g_ctrl is None
               else g_ctrl.float())
        dx, dw = linear_grads_from_upstream(
            hidden, weight, targets, control_ids, ctx.inv_tau, entropy, g_y, g_h, g_c,
            ctx.backend, ctx.workspace_bytes,
            need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        return dx, dw, None, None, None, None, None


def linear_token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       control_ids: Sequence[int] | torch.Tensor | None = None,
                       temperature: float = 1.0, ignore_index: int = -100, backend: str = "auto",
                       workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> TokenStats:
    """Per-token log p(target), entropy, log p(control ids) and lse of softmax(hidden @ weight^T / T).

    Rows whose target is `ignore_index` are skipped (all outputs 0 there, zero gradient).
    Differentiable w.r.t. hidden and weight through logprobs, entropy and control_logprobs.
    """
    active = targets != ignore_index if isinstance(targets, torch.Tensor) else None
    check_linear_inputs(hidden, weight, targets, active)
    inv_tau = 1.0 / check_temperature(temperature)
    control = as_control_ids(control_ids, weight.shape[0], hidden.device)
    backend = resolve_backend(backend, hidden.device)

    n, k = hidden.shape[0], control.numel()
    if bool(active.all()):
        return TokenStats(*_LinearTokenStats.apply(hidden, weight, targets.long(), control, inv_tau,
                                                   backend, workspace_bytes))
    # Select loss rows first: ignored rows are never computed.
    idx = active.nonzero()[:, 0]
    logp, ent, ctrl, lse = _LinearTokenStats.apply(hidden[idx], weight, targets[idx].long(), control,
                                                   inv_tau, backend, workspace_bytes)
    full = hidden.new_zeros((n, 3 + k), dtype=torch.float32)
    full = full.index_copy(0, idx, torch.cat([logp[:, None], ent[:, None], lse[:, None], ctrl], 1))
    return TokenStats(full[:, 0], full[:, 1], full[:, 3:], full[:, 2].detach())
