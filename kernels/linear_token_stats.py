"""Fused forward of the token statistics: X [N, H] @ W[V, H]^T with an online-softmax epilogue.

Each program owns BLOCK_N rows and one contiguous split of the vocabulary. It walks its split in
BLOCK_V tiles; for each tile it forms the logits tile with tl.dot over H (fp32 accumulation) and
folds it into running per-row statistics (the maths: fastrl/ops/linear_token_stats.py):

    m  running max of z            (starts at -inf)
    s  sum exp(z - m)
    u  sum exp(z - m) * (z - m)    (gives the entropy without a second pass)
    zy z at the target column

The [N, V] logits never exist: only one [BLOCK_N, BLOCK_V] tile lives in registers. Partial
statistics of the vocabulary splits are merged on the host with the same rescaling rule (the
vocabulary analogue of split-K), in a fixed order, so results are deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _linear_stats_fwd_kernel(
    X, W, Y,                       # hidden [N, H], weight [V, H], targets [N] (int64)
    M_OUT, S_OUT, U_OUT, ZY_OUT,   # partials [num_splits, N], fp32
    N, V, H,
    stride_xn, stride_xh, stride_wv, stride_wh,
    inv_tau,
    num_row_blocks, num_splits, v_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_H: tl.constexpr,
):
    # Grouped launch order: GROUP_N row blocks x all splits run together, so concurrently
    # running programs share their X tiles (rows) and W tiles (vocabulary) through L2.
    pid = tl.program_id(0)
    group_size = GROUP_N * num_splits
    group = pid // group_size
    first_block = group * GROUP_N
    blocks_in_group = tl.minimum(num_row_blocks - first_block, GROUP_N)
    local = pid % group_size
    pid_n = first_block + local % blocks_in_group
    pid_s = local // blocks_in_group

    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(Y + rows, mask=row_mask, other=-1)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)

    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    offs_h = tl.arange(0, BLOCK_H)
    x_base = X + rows[:, None] * stride_xn + offs_h[None, :] * stride_xh
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        # Pointers advance by one H tile per step (no per-element index maths in the hot loop).
        x_ptrs = x_base
        w_ptrs = W + cols.to(tl.int64)[:, None] * stride_wv + offs_h[None, :] * stride_wh
        for h0 in range(0, H, BLOCK_H):
            if EVEN_H:
                x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_mask[:, None], other=0.0)
            else:
                h_mask = (h0 + offs_h) < H
                x = tl.load(x_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_H * stride_xh
            w_ptrs += BLOCK_H * stride_wh
        # Columns past the split are -inf, never 0: a 0 would enter the softmax as a real logit.
        z = tl.where(col_mask[None, :], acc * inv_tau, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        d = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_mask[None, :], tl.exp(d), 0.0)
        # m == -inf only before the first tile, when s == u == 0: keep the shift finite there.
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.exp(shift)
        u = alpha * (u + shift * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

    out = pid_s.to(tl.int64) * N + rows
    tl.store(M_OUT + out, m, mask=row_mask)
    tl.store(S_OUT + out, s, mask=row_mask)
    tl.store(U_OUT + out, u, mask=row_mask)
    tl.store(ZY_OUT + out, zy, mask=row_mask)


# Tile config on CUDA; `python -m bench.kernels --tune` times the candidates below and reports
# the fastest (the benchmark JSON records which config each result used). This one was the
# fastest of the sweep on an H200 (bench/results/kernels_nvidia_h200.json: 20.4 ms against
# 20.9-22.2 ms for the others at N=8192, H=4096, V=151936).
CUDA_CONFIG = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=128, GROUP_N=8, num_warps=8, num_stages=3)
CUDA_CANDIDATES = [
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=4),
    dict(BLOCK_N=256, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=128, GROUP_N=8, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_H=64, GROUP_N=32, num_warps=8, num_stages=3),
]   # 256/256/64 with 16 warps was dropped: ptxas runs out of registers for it on an H200


def _default_config(hidden: torch.Tensor) -> dict:
    if hidden.is_cuda:
        cfg = dict(CUDA_CONFIG)
        # The tiles are sized for 2-byte inputs; fp32 tiles of the same BLOCK_H need twice the
        # shared memory (128/128/128 in fp32 asks 256 KiB of the H200's 227 KiB): halve BLOCK_H.
        cfg["BLOCK_H"] = max(16, cfg["BLOCK_H"] * 2 // hidden.element_size())
        return cfg
    # Interpreter (CPU tensors): small tiles keep it quick while still exercising ragged edges.
    return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32, GROUP_N=2, num_warps=4, num_stages=1)


def merge_split_stats(m, s, u, zy):
    """Merge per-split (m, s, u, zy) [num_splits, N] into lse, entropy, z_target [N]."""
    m_all = m.max(dim=0).values
    alpha = torch.exp(m - m_all)
    s_all = (alpha * s).sum(dim=0)
    u_all = (alpha * (u + (m - m_all) * s)).sum(dim=0)
    log_s = torch.log(s_all)
    mean_shift = u_all / s_all            # E_p[z] - m
    lse = m_all + log_s
    entropy = log_s - mean_shift
    return lse, entropy, zy.sum(dim=0)


def linear_stats_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     inv_tau: float, num_splits: int | None = None, **config):
    """lse, entropy and z_target (fp32, [N]) of z = hidden @ weight^T * inv_tau.

    Every target must be a valid column: the caller selects loss rows first.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        empty = hidden.new_empty(0, dtype=torch.float32)
        return empty, empty.clone(), empty.clone()
    cfg = {**_default_config(hidden), **config}
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    num_row_blocks = triton.cdiv(n, block_n)
    num_v_tiles = triton.cdiv(v, block_v)
    if num_splits is None:
        # Enough programs to fill the GPU even when N is small; splits are cheap to merge.
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 1
        num_splits = (max(cfg["GROUP_N"] * 2, triton.cdiv(2 * sms, num_row_blocks)) if hidden.is_cuda
                      else 3)  # interpreter: several splits so the merge is always exercised
    num_splits = max(1, min(num_splits, num_v_tiles))
    # Whole tiles per split, so only the last tile of the last split is ragged.
    v_per_split = triton.cdiv(num_v_tiles, num_splits) * block_v
    num_splits = triton.cdiv(v, v_per_split)

    targets = targets.contiguous()
    partial = torch.empty((4, num_splits, n), device=hidden.device, dtype=torch.float32)
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    grid = (num_row_blocks * num_splits,)
    _linear_stats_fwd_kernel[grid](
        hidden, weight, targets, partial[0], partial[1], partial[2], partial[3],
        n, v, h,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(inv_tau),
        num_row_blocks, num_splits, v_per_split,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=cfg["BLOCK_H"], GROUP_N=cfg["GROUP_N"],
        INPUT_PRECISION=precision, EVEN_H=h % cfg["BLOCK_H"] == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return merge_split_stats(partial[0], partial[1], partial[2], partial[3])
