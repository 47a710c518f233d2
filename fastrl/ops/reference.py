"""Plain PyTorch references of fastrl.ops that materialise the full [N, V] logits.

They are the specification the fused kernels are tested against (run them in float64). They are
written independently of the fused code on purpose: explicit formulas, autograd for gradients.
"""
from __future__ import annotations

import torch

from fastrl.ops.token_kind import TokenKind


def reference_token_stats(hidden, weight, targets, control_ids=None, temperature=1.0, ignore_index=-100):
    """(logprobs, entropy, control_logprobs, lse), zeros at ignored rows; differentiable."""
    z = (hidden @ weight.T) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    active = targets != ignore_index
    safe_targets = torch.where(active, targets, torch.zeros_like(targets))
    keep = active.to(z.dtype)
    logprobs = log_p.gather(1, safe_targets[:, None].long())[:, 0] * keep
    entropy = -(log_p.exp() * log_p).sum(-1) * keep
    ids = torch.as_tensor([] if control_ids is None else list(control_ids), dtype=torch.long)
    control_logprobs = log_p[:, ids.to(z.device)] * keep[:, None]
    lse = torch.logsumexp(z, dim=-1) * keep
    return logprobs, entropy, control_logprobs, lse


def reference_policy_loss(hidden, weight, targets, kinds, advantages=None, old_logprobs=None,
                          ref_logprobs=None, seq_ids=None, num_tokens=None, num_sequences=None, *,
                          eps_low=0.2, eps_high=0.2, dual_clip=None, kl_coef=0.0, kl_estimator="k3",
                          entropy_coef=0.0, sft_weight=1.0, unlikelihood_weight=1.0,
                          aggregation="token_mean", loss_constant=None, temperature=1.0,
                          on_policy_rows=None):
    """The scalar loss, token by token, over materialised logits; differentiable."""
    z = (hidden @ weight.T) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    total = z.new_zeros(())
    active = [t for t in range(len(kinds)) if int(kinds[t]) != TokenKind.IGNORE]
    if aggregation == "seq_mean":
        lengths = {}
        for t in active:
            lengths[int(seq_ids[t])] = lengths.get(int(seq_ids[t]), 0) + 1
        n_seq = len(lengths) if num_sequences is None else num_sequences
    for t in active:
        logp = log_p[t, int(targets[t])]
        kind = int(kinds[t])
        if kind == TokenKind.RL:
            entropy = -(log_p[t].exp() * log_p[t]).sum()
            adv = float(advantages[t])
            on_policy = old_logprobs is None or (on_policy_rows is not None and bool(on_policy_rows[t]))
            old = logp.detach() if on_policy else float(old_logprobs[t])
            ratio = torch.exp(logp - old)
            surrogate = min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
            term = -surrogate
            if dual_clip is not None and adv < 0:
                term = min(term, -adv * dual_clip)
            if kl_coef:
                log_ratio = logp - float(ref_logprobs[t])      # log(pi / ref)
                kl = log_ratio if kl_estimator == "k1" else torch.exp(-log_ratio) + log_ratio - 1
                term = term + kl_coef * kl
            term = term - entropy_coef * entropy
        elif kind == TokenKind.SFT:
            term = -sft_weight * logp
        else:
            p = logp.exp()
            term = -unlikelihood_weight * torch.log(torch.clamp(1 - p, min=1e-6))
        if aggregation == "token_mean":
            weight_t = 1.0 / (len(active) if num_tokens is None else num_tokens)
        elif aggregation == "constant":
            weight_t = 1.0 / loss_constant
        else:
            weight_t = 1.0 / (lengths[int(seq_ids[t])] * n_seq)
        total = total + weight_t * term
    return total
