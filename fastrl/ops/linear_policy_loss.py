"""The whole training loss of a packed micro-batch, from hidden states, in one call.

Each loss row t has a kind (fastrl.ops.TokenKind) and contributes w_t * loss_t:

    RL            pg_t + kl_coef * kl_t - entropy_coef * H_t
                  pg_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = exp(logp - old),
                  with dual clip: pg_t = min(pg_t, -A * dual_clip) where A < 0
                  kl_t = logp - ref (k1) or exp(ref - logp) - (ref - logp) - 1 (k3)
    SFT           -sft_weight * logp
    UNLIKELIHOOD  -unlikelihood_weight * log(max(1 - p, 1e-6)),  p = exp(logp)
    IGNORE        0 (never computed)

Aggregation (w_t): "token_mean" 1 / num_tokens (the global count of loss tokens across
micro-batches and ranks, so the parts add up to the whole-batch loss); "seq_mean"
1 / (len_s * num_sequences), len_s the loss tokens of t's sequence (sequences are never split
across micro-batches); "constant" 1 / loss_constant (Dr.GRPO).

Every term depends on the token only through log p_y and H, so the gradient is formed right
here: per token chunk, logits are computed once, their row statistics give logp and H, the O(n)
loss is differentiated by autograd on those vectors, and the closed-form logit gradient feeds the
dX and dW matrix products (6 N H V FLOPs; workspace bounded by config.workspace_bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastrl.ops.linear_token_stats import (
    DEFAULT_WORKSPACE_BYTES,
    accumulate_weight_grad,
    as_control_ids,
    chunk_workspace,
    check_linear_inputs,
    check_temperature,
    logits_fp32,
    logits_grad,
    resolve_backend,
    rows_per_chunk,
    softmax_row_stats,
    weight_grad_buffer,
)
from fastrl.ops.token_kind import TokenKind

AGGREGATIONS = ("token_mean", "seq_mean", "constant")
UNLIKELIHOOD_EPS = 1e-6


@dataclass
class PolicyLossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2              # > eps_low gives "clip-higher"
    dual_clip: float | None = None     # e.g. 3.0; bounds the loss of negative-advantage tokens
    kl_coef: float = 0.0               # > 0 needs ref_logprobs
    kl_estimator: str = "k3"           # "k1" or "k3"
    entropy_coef: float = 0.0
    sft_weight: float = 1.0
    unlikelihood_weight: float = 1.0
    aggregation: str = "token_mean"    # "token_mean" | "seq_mean" | "constant"
    loss_constant: float | None = None  # the normaliser of aggregation="constant"
    temperature: float = 1.0           # as the rollout engine applies it: z / temperature
    control_metrics: bool = True       # compute the control-token statistics (needs control_ids)
    spike_threshold: float = 0.5       # max_c p(c) above this at a non-control target is a spike
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES

    def validate(self) -> None:
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"eps_low/eps_high must be >= 0, got {self.eps_low}/{self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.aggregation == "constant" and not (self.loss_constant and self.loss_constant > 0):
            raise ValueError("aggregation='constant' needs loss_constant > 0, "
                             f"got {self.loss_constant!r}")
        if not 0 < self.spike_threshold < 1:
            raise ValueError(f"spike_threshold must be in (0, 1), got {self.spike_threshold}")
        check_temperature(self.temperature)


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor        # scalar, differentiable w.r.t. hidden and weight
    metrics: dict             # detached 0-d tensors (see _metrics)
    logprobs: torch.Tensor    # [N] fp32 trainer log-probs of the targets (0 at IGNORE rows)
    entropy: torch.Tensor     # [N] fp32 (0 at IGNORE rows)


def token_losses(logp, entropy, kinds, advantages, old_logprobs, ref_logprobs, cfg: PolicyLossConfig,
                 on_policy_rows=None):
    """Per-token loss_t (before aggregation weights) and the RL clip mask. Differentiable in
    logp and entropy; everything else is data. `on_policy_rows` (bool) marks RL rows whose ratio
    is 1 (old = logp, detached) whatever old_logprobs says.

    Every kind's term is computed on every row and picked with torch.where: boolean indexing
    would sync with the host once per token chunk and idle the GPU while the chunk's small ops
    are issued. Rows of other kinds get finite stand-ins for their data first, since a branch
    that where() discards still sends 0 * inf = NaN back through autograd."""
    rl = kinds == TokenKind.RL
    lp_fixed = logp.detach()
    adv = torch.zeros_like(logp) if advantages is None else torch.where(rl, advantages.float(), 0.0)
    old = lp_fixed if old_logprobs is None else torch.where(rl, old_logprobs.float(), lp_fixed)
    if old_logprobs is not None and on_policy_rows is not None:
        old = torch.where(on_policy_rows, lp_fixed, old)
    ratio = torch.exp(logp - old)
    unclipped = -adv * ratio
    clipped_obj = -adv * torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
    rl_loss = torch.maximum(unclipped, clipped_obj)
    if cfg.dual_clip is not None:
        rl_loss = torch.where(adv < 0, torch.minimum(rl_loss, -adv * cfg.dual_clip), rl_loss)
    rl_loss = rl_loss - cfg.entropy_coef * entropy
    kl = torch.zeros_like(lp_fixed)
    if cfg.kl_coef and ref_logprobs is not None:
        delta = torch.where(rl, ref_logprobs.float(), lp_fixed) - logp
        kl_rl = -delta if cfg.kl_estimator == "k1" else torch.exp(delta) - delta - 1
        rl_loss = rl_loss + cfg.kl_coef * kl_rl
        kl = torch.where(rl, kl_rl.detach(), 0.0)

    one_minus_p = torch.clamp(-torch.expm1(logp), min=UNLIKELIHOOD_EPS)
    loss = torch.where(rl, rl_loss,
                       torch.where(kinds == TokenKind.SFT, -cfg.sft_weight * logp,
                                   torch.where(kinds == TokenKind.UNLIKELIHOOD,
                                               -cfg.unlikelihood_weight * torch.log(one_minus_p), 0.0)))
    clipped = rl & (clipped_obj.detach() > unclipped.detach())
    return loss, clipped, kl


def aggregation_weights(kinds, seq_ids, cfg: PolicyLossConfig, num_tokens, num_sequences):
    """w_t per row (0 at IGNORE rows)."""
    active = kinds != TokenKind.IGNORE
    weights = active.float()
    if cfg.aggregation == "token_mean":
        count = int(active.sum()) if num_tokens is None else num_tokens
        return weights / max(count, 1)
    if cfg.aggregation == "constant":
        return weights / cfg.loss_constant
    # seq_mean: each sequence's mean over its loss tokens, then the mean over sequences.
    if seq_ids is None:
        raise ValueError("aggregation='seq_mean' needs seq_ids (the sequence index of each row)")
    seq = seq_ids.long()
    _, inverse, counts = torch.unique(seq[active], return_inverse=True, return_counts=True)
    count = counts.numel() if num_sequences is None else num_sequences
    weights[active] = 1.0 / (counts[inverse].float() * max(count, 1))
    return weights


def _check_per_token(name, tensor, n, device, required):
    if tensor is None:
        if required:
            raise ValueError(f"{name} is required here (see PolicyLossConfig and kinds)")
        return
    if not isinstance(tensor, torch.Tensor) or tensor.shape != (n,):
        raise ValueError(f"{name} must be a tensor of shape [{n}], got "
                         f"{tuple(getattr(tensor, 'shape', ())) or type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but hidden is on {device}")


def _check_finite_at(name, tensor, mask):
    if tensor is not None and bool((~torch.isfinite(tensor) & mask).any()):
        i = int((~torch.isfinite(tensor) & mask).nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {float(tensor[i])} is not finite")


class _PolicyLoss(torch.autograd.Function):
    """Forward computes the loss and, from the same logits chunks, dX and dW; backward scales."""

    @staticmethod
    def forward(ctx, hidden, weight, loss_value, dx, dw):
        ctx.save_for_backward(dx, dw)
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        # In place: dx and dw are this call's own buffers, so scaling by the upstream gradient
        # costs no second [V, H] copy. A second backward through the same graph would scale twice.
        if getattr(ctx, "done", False):
            raise RuntimeError("linear_policy_loss: backward ran twice through the same loss "
                               "(retain_graph is not supported); call the op again instead")
        ctx.done = True
        dx, dw = ctx.saved_tensors   # None where that gradient was not needed
        if bool(grad_out != 1):      # the usual loss.backward() passes 1: skip a pass over [V, H]
            dx = None if dx is None else dx.mul_(grad_out.to(dx.dtype))
            dw = None if dw is None else dw.mul_(grad_out.to(dw.dtype))
        return dx, dw, None, None, None


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                       kinds: torch.Tensor, advantages: torch.Tensor | None,
                       old_logprobs: torch.Tensor | None = None,
                       ref_logprobs: torch.Tensor | None = None, control_ids=None,
                       config: PolicyLossConfig | None = None, seq_ids: torch.Tensor | None = None,
                       num_tokens: int | None = None, num_sequences: int | None = None,
                       on_policy_rows: torch.Tensor | None = None,
                       backend: str = "auto") -> PolicyLossOutput:
    """Loss of one packed micro-batch (see module docstring) with its gradient formed in place.

    num_tokens / num_sequences: the global normalisers of "token_mean" / "seq_mean" (default: the
    counts in this call). old_logprobs=None means on-policy (ratio 1, detached); `on_policy_rows`
    (bool [N]) makes chosen rows on-policy while the others use old_logprobs (e.g. an expert
    trajectory that replaced a rollout of its group has no behaviour log-probs).
    """
    cfg = config or PolicyLossConfig()
    cfg.validate()
    n = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 else None
    if not isinstance(kinds, torch.Tensor) or kinds.dim() != 1 or kinds.dtype.is_floating_point:
        raise ValueError(f"kinds must be a 1-D integer tensor of TokenKind values, got {kinds!r}")
    bad_kind = (kinds < TokenKind.IGNORE) | (kinds > TokenKind.UNLIKELIHOOD)
    if bool(bad_kind.any()):
        i = int(bad_kind.nonzero()[0, 0])
        raise ValueError(f"kinds[{i}] = {int(kinds[i])} is not a TokenKind value (0..3)")
    active = kinds != TokenKind.IGNORE
    check_linear_inputs(hidden, weight, targets, active if kinds.shape == targets.shape else None)
    if kinds.shape[0] != n:
        raise ValueError(f"kinds has {kinds.shape[0]} entries but hidden has {n} rows")
    device = hidden.device
    rl_mask = kinds == TokenKind.RL
    has_rl = bool(rl_mask.any())
    _check_per_token("advantages", advantages, n, device, required=has_rl)
    _check_per_token("old_logprobs", old_logprobs, n, device, required=False)
    _check_per_token("ref_logprobs", ref_logprobs, n, device, required=has_rl and cfg.kl_coef != 0)
    _check_per_token("seq_ids", seq_ids, n, device, required=cfg.aggregation == "seq_mean")
    _check_per_token("on_policy_rows", on_policy_rows, n, device, required=False)
    if on_policy_rows is not None and on_policy_rows.dtype != torch.bool:
        raise ValueError(f"on_policy_rows must be a bool tensor, got {on_policy_rows.dtype}")
    off_policy_rl = rl_mask if on_policy_rows is None else rl_mask & ~on_policy_rows
    _check_finite_at("advantages", advantages, rl_mask)
    _check_finite_at("old_logprobs", old_logprobs, off_policy_rl)
    _check_finite_at("ref_logprobs", ref_logprobs, rl_mask if cfg.kl_coef else torch.zeros_like(rl_mask))
    for name, value in (("num_tokens", num_tokens), ("num_sequences", num_sequences)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int (the global count), got {value!r}")
    control = as_control_ids(control_ids, weight.shape[0], device)
    if cfg.control_metrics and control.numel() == 0:
        raise ValueError("control_ids is empty but config.control_metrics=True needs the control-token "
                         "ids (pass control_ids, or set control_metrics=False)")
    backend = resolve_backend(backend, device)
    inv_tau = 1.0 / cfg.temperature

    weights = aggregation_weights(kinds, seq_ids, cfg, num_tokens, num_sequences)
    idx = active.nonzero()[:, 0]
    n_act, vocab, k = idx.numel(), weight.shape[0], control.numel()
    need_dx = hidden.requires_grad and torch.is_grad_enabled()
    need_dw = weight.requires_grad and torch.is_grad_enabled()

    all_rows = n_act == n   # the usual packed batch: no gathered copy of hidden, dx written in place
    x_all = hidden.detach() if all_rows else hidden.detach().index_select(0, idx)
    w = weight.detach()
    y_all = targets.index_select(0, idx).long()
    sel = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
    kinds_a, adv_a, old_a, ref_a, w_a = (sel(kinds), sel(advantages), sel(old_logprobs),
                                          sel(ref_logprobs), weights.index_select(0, idx))
    onp_a = sel(on_policy_rows)

    logp_a = torch.zeros(n_act, device=device)
    ent_a = torch.zeros(n_act, device=device)
    ctrl_a = torch.zeros((n_act, k), device=device)
    clip_a = torch.zeros(n_act, device=device, dtype=torch.bool)
    kl_a = torch.zeros(n_act, device=device)
    dx_a = torch.empty_like(x_all) if need_dx else None
    dw_acc = weight_grad_buffer(weight, cfg.workspace_bytes) if need_dw else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    extra = 0 if hidden.dtype == torch.float32 else hidden.element_size()
    rows = rows_per_chunk(vocab, 4 + extra, chunk_workspace(weight, dw_acc, cfg.workspace_bytes)) if n_act else 1
    w_mm = w if (w.dtype == torch.float32 or w.is_cuda) else w.float()
    for start in range(0, n_act, rows):
        end = min(start + rows, n_act)
        x = x_all[start:end]
        y = y_all[start:end]
        logits = logits_fp32(x if w_mm.dtype == x.dtype else x.to(w_mm.dtype), w_mm)
        lse, ent, zy = softmax_row_stats(logits, y, inv_tau, backend)
        if k:
            ctrl_a[start:end] = logits[:, control] * inv_tau - lse[:, None]
        logp = (zy - lse).requires_grad_(True)
        entropy = ent.clone().requires_grad_(True)
        with torch.enable_grad():
            per_token, clipped, kl = token_losses(
                logp, entropy, kinds_a[start:end], None if adv_a is None else adv_a[start:end],
                None if old_a is None else old_a[start:end], None if ref_a is None else ref_a[start:end],
                cfg, None if onp_a is None else onp_a[start:end])
            chunk_loss = (w_a[start:end] * per_token).sum()
            if need_dx or need_dw:
                g_y, g_h = torch.autograd.grad(chunk_loss, [logp, entropy], allow_unused=True)
        loss_sum += chunk_loss.detach().double()
        logp_a[start:end], ent_a[start:end] = logp.detach(), ent
        clip_a[start:end], kl_a[start:end] = clipped, kl
        if need_dx or need_dw:
            g_y = torch.zeros_like(lse) if g_y is None else g_y
            g_h = torch.zeros_like(lse) if g_h is None else g_h
            dz = logits_grad(logits, lse, -g_h * ent - g_y, -g_h, y, g_y, inv_tau, hidden.dtype, backend)
            if need_dx:
                torch.mm(dz, w, out=dx_a[start:end])
            if need_dw:
                accumulate_weight_grad(dw_acc, dz, x)
            del dz
        del logits

    dx = None
    if need_dx:
        dx = dx_a if all_rows else torch.zeros_like(hidden).index_copy_(0, idx, dx_a)
    dw = dw_acc.to(weight.dtype) if need_dw else None
    del dw_acc
    loss_value = loss_sum.float()
    loss = _PolicyLoss.apply(hidden, weight, loss_value, dx, dw) if (need_dx or need_dw) else loss_value

    logprobs = torch.zeros(n, device=device).index_copy_(0, idx, logp_a)
    entropy_full = torch.zeros(n, device=device).index_copy_(0, idx, ent_a)
    gap_old = old_a if (old_a is None or onp_a is None) else torch.where(onp_a, logp_a, old_a)
    metrics = _metrics(kinds_a, y_all, logp_a, ent_a, ctrl_a, clip_a, kl_a, gap_old, control, cfg)
    return PolicyLossOutput(loss, metrics, logprobs, entropy_full)


def _masked_mean(x, mask):
    # where, not x * mask: values outside the mask may be inf/NaN (e.g. old log-probs at SFT rows)
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def _metrics(kinds, targets, logp, entropy, control_logprobs, clipped, kl, old, control, cfg):
    """Detached per-micro-batch metrics; counts come along so callers can combine micro-batches."""
    rl = kinds == TokenKind.RL
    m = {
        "tokens_rl": rl.sum(),
        "tokens_sft": (kinds == TokenKind.SFT).sum(),
        "tokens_unlikelihood": (kinds == TokenKind.UNLIKELIHOOD).sum(),
        "clip_fraction": _masked_mean(clipped.float(), rl),
        "kl_mean": _masked_mean(kl, rl),
        "entropy_mean": entropy.mean() if entropy.numel() else entropy.new_zeros(()),
        "entropy_rl_mean": _masked_mean(entropy, rl),
    }
    if old is not None:
        m["logprob_gap_mean"] = _masked_mean((logp - old.float()).abs(), rl)
    if control.numel():
        p_c = control_logprobs.exp()
        p_ctrl = p_c.sum(dim=1)
        max_c = p_c.max(dim=1).values
        is_ctrl = torch.isin(targets, control)
        plain = rl & ~is_ctrl
        at_ctrl = rl & is_ctrl
        m.update({
            "tokens_rl_control_target": at_ctrl.sum(),
            "intrusion_mean": _masked_mean(p_ctrl, plain),
            "intrusion_max": torch.where(plain, p_ctrl, 0.0).max() if plain.numel() else p_ctrl.new_zeros(()),
            "control_confidence_mean": _masked_mean(logp, at_ctrl),
            # 0 when no RL row targets a control token; where(), not an if: no host sync
            "control_confidence_min": (torch.where(at_ctrl.any(),
                                                   torch.where(at_ctrl, logp, float("inf")).min(), 0.0)
                                       if logp.numel() else logp.new_zeros(())),
            "entropy_control_mean": _masked_mean(entropy, at_ctrl),
            "spike_count": (plain & (max_c > cfg.spike_threshold)).sum(),
        })
    return m
