"""One optimisation step over a list of token-space trajectories.

    trajectories -> SequenceStore -> packed micro-batches (first-fit-decreasing)
    for each micro-batch: one forward of the base model -> hidden states of the loss rows
                          -> fastrl.ops.linear_policy_loss (RL, SFT and unlikelihood rows together)
                          -> backward
    all-reduce gradients (data parallel) -> non-finite check -> clip -> optimizer step

RL rollouts, expert trajectories and erroneous tokens share the micro-batches and the one
forward: supervision costs no extra forward pass. The loss is normalised by the global count of
loss tokens (and sequences), so micro-batches and ranks add up to the whole-batch loss.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastrl.data import SequenceStore
from fastrl.data.packed import pack_micro_batches
from fastrl.data.packed_forward import packed_forward
from fastrl.ops import PolicyLossConfig, TokenKind, linear_policy_loss, linear_token_stats
from fastrl.trainer.distributed import (forward_with_head, global_micro_batches, idle_forward,
                                        idle_forward_backward, is_sharded)

# Metrics that are sums over micro-batches (counts); the rest are token-weighted means.
COUNT_METRICS = ("tokens_rl", "tokens_sft", "tokens_unlikelihood", "tokens_rl_control_target", "spike_count")
MAX_METRICS = ("intrusion_max",)
MIN_METRICS = ("control_confidence_min",)


@dataclass
class UpdateResult:
    loss: float
    grad_norm: float
    skipped: bool            # non-finite loss or gradient: weights untouched
    metrics: dict
    forward_passes: int      # forwards of the policy model
    ref_forward_passes: int  # forwards of the reference model (only when kl_coef != 0)
    seconds_forward_backward: float
    seconds_optimizer: float
    probe_forward_passes: int = 0   # forward-only passes of the post-update probe (probe=True)
    seconds_probe: float = 0.0


def _world() -> tuple[int, bool]:
    # In-process vLLM initialises a process group of its own (world size 1): nothing to reduce.
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), True
    return 1, False


def _all_reduce_sum(values: list[float], device) -> list[float]:
    world, on = _world()
    if not on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# Means over a subset of the loss rows are weighted by that subset's count in each micro-batch,
# so the combination equals the mean over the whole step; other means by the loss rows.
MEAN_WEIGHTS = {
    "clip_fraction": lambda m: m["tokens_rl"], "kl_mean": lambda m: m["tokens_rl"],
    "logprob_gap_mean": lambda m: m["tokens_rl"], "entropy_rl_mean": lambda m: m["tokens_rl"],
    "intrusion_mean": lambda m: m["tokens_rl"] - m.get("tokens_rl_control_target", 0),
    "control_confidence_mean": lambda m: m.get("tokens_rl_control_target", 0),
    "entropy_control_mean": lambda m: m.get("tokens_rl_control_target", 0),
}


def _combine(metrics_list: list[dict], weights: list[float]) -> dict:
    """Token-weighted combination of per-micro-batch metrics."""
    out = {}
    keys = set().union(*[m.keys() for m in metrics_list]) if metrics_list else set()
    for k in keys:
        vals = [(float(m[k]), float(MEAN_WEIGHTS[k](m)) if k in MEAN_WEIGHTS and "tokens_rl" in m else w)
                for m, w in zip(metrics_list, weights) if k in m]
        if k in COUNT_METRICS:
            out[k] = sum(v for v, _ in vals)
        elif k in MAX_METRICS:
            out[k] = max(v for v, _ in vals)
        elif k in MIN_METRICS:
            out[k] = min(v for v, _ in vals)
        else:
            total = sum(w for _, w in vals)
            out[k] = sum(v * w for v, w in vals) / total if total else 0.0
    return out


def policy_update(model, trajectories, *, optimizer, loss_config: PolicyLossConfig, control_ids,
                  micro_batch_tokens: int, grad_clip: float | None = 1.0, old_logprobs: str = "rollout",
                  ref_model=None, lr: float | None = None, on_policy: list[bool] | None = None,
                  backend: str = "auto", autocast: torch.dtype | None = None,
                  probe: bool = False) -> UpdateResult:
    """Forward/backward over all micro-batches of `trajectories`, then one optimizer step.

    old_logprobs: "rollout" (the engine's sampling log-probs are the behaviour policy) or
    "on_policy" (ratio 1, detached). `lr` overrides the optimizer's learning rate for this step
    (e.g. an SFT phase with its own rate). `on_policy[i]` trains trajectory i's RL tokens with
    ratio 1 (an expert that replaced a rollout, or a hinted sample without importance
    correction). With torch.distributed initialised, each rank passes
    its own trajectories; counts and gradients are summed over ranks.

    autocast (torch.bfloat16 / torch.float16): mixed precision. The model keeps its own (fp32)
    weights and the optimizer updates them; the forward runs under torch.autocast, and the fused
    loss gets the final hidden states and the LM-head weight cast to this dtype (what autocast does
    to a linear layer), its gradient flowing back to the fp32 weight through the cast.
    """
    if old_logprobs not in ("rollout", "on_policy"):
        raise ValueError(f"old_logprobs must be 'rollout' or 'on_policy', got {old_logprobs!r}")
    if loss_config.kl_coef and ref_model is None:
        raise ValueError("loss.kl_coef != 0 needs a reference model")
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]   # a sharded parameter keeps its full shape
    sharded = is_sharded(model)    # FSDP2: gradients are summed into each rank's shard by FSDP
    t0 = time.perf_counter()

    if on_policy is not None and len(on_policy) != len(trajectories):
        raise ValueError(f"on_policy has {len(on_policy)} flags for {len(trajectories)} trajectories")
    flags = torch.tensor([bool(f) for f in on_policy] if on_policy is not None else [], dtype=torch.bool)
    store = SequenceStore.from_trajectories(trajectories)
    # The budget is a packing target: a sequence longer than it gets a micro-batch of its own
    # (never truncated, never a crash of the run).
    budget = max(micro_batch_tokens, int(store.lengths.max()))
    batches = pack_micro_batches(store, budget, vocab)
    local_tokens = sum(int((b.kinds != TokenKind.IGNORE).sum()) for b in batches)
    local_seqs = sum(len(set(b.seq_index[b.kinds != TokenKind.IGNORE].tolist())) for b in batches)
    global_tokens, global_seqs = (int(v) for v in _all_reduce_sum([local_tokens, local_seqs], device))

    model.train()
    loss_total, forwards, ref_forwards = 0.0, 0, 0
    metrics_list, weights = [], []
    for t, rows in _loss_micro_batches(model, batches, device, idle_forward_backward):
        hidden, head = _hidden_and_head(model, t, autocast)
        forwards += 1
        ref_lp = None
        if loss_config.kl_coef:
            with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                ref_hidden = packed_forward(ref_model, t["input_ids"], t["position_ids"],
                                            t["cu_seqlens"]).hidden_states
                ref_head = ref_model.get_output_embeddings().weight
                if autocast is not None:
                    ref_hidden, ref_head = ref_hidden.to(autocast), ref_head.to(autocast)
                ref_lp = linear_token_stats(ref_hidden[rows], ref_head,
                                            t["target_ids"][rows], temperature=loss_config.temperature,
                                            backend=backend).logprobs
            ref_forwards += 1
        out = linear_policy_loss(
            hidden[rows], head, t["target_ids"][rows], kinds=t["kinds"][rows],
            advantages=t["advantages"][rows],
            old_logprobs=t["logprobs"][rows] if old_logprobs == "rollout" else None,
            ref_logprobs=ref_lp, control_ids=control_ids, config=loss_config,
            seq_ids=t["seq_index"][rows], num_tokens=global_tokens, num_sequences=global_seqs,
            on_policy_rows=_on_policy_rows(flags, t, rows),
            backend=backend)
        out.loss.backward()
        loss_total += float(out.loss.detach())
        metrics_list.append(out.metrics)
        weights.append(float(rows.numel()))
    t1 = time.perf_counter()

    params = [p for p in model.parameters() if p.requires_grad]
    world, on = _world()
    if on:
        if not sharded:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        loss_total = _all_reduce_sum([loss_total], device)[0]
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    finite = math.isfinite(loss_total) and math.isfinite(grad_norm) and bool(grads)
    if finite:
        if lr is not None:
            saved = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = lr
        optimizer.step()
        if lr is not None:
            for g, s in zip(optimizer.param_groups, saved):
                g["lr"] = s
    optimizer.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    metrics = _combine(metrics_list, weights)
    metrics.update(loss_tokens=global_tokens, micro_batches=len(batches))
    probe_forwards = 0
    if probe and finite:
        post, probe_forwards = _probe(model, batches, device, loss_config, control_ids, global_tokens,
                                      global_seqs, flags, backend, autocast)
        metrics.update({f"post_{k}": v for k, v in post.items() if k in PROBE_METRICS})
    return UpdateResult(loss=loss_total, grad_norm=grad_norm, skipped=not finite, metrics=metrics,
                        forward_passes=forwards, ref_forward_passes=ref_forwards,
                        seconds_forward_backward=t1 - t0, seconds_optimizer=t2 - t1,
                        probe_forward_passes=probe_forwards, seconds_probe=time.perf_counter() - t2)


def _loss_micro_batches(model, batches, device, idle):
    """(tensors, loss-row indices) of each micro-batch that has loss rows. Every rank runs the same
    number of passes (FSDP collectives must pair up): a rank out of batches, or on one without
    loss rows, calls idle(model) instead."""
    for i in range(global_micro_batches(len(batches), device)):
        t = batches[i].to_torch(device) if i < len(batches) else None
        rows = (t["kinds"] != TokenKind.IGNORE).nonzero()[:, 0] if t is not None else None
        if t is None or rows.numel() == 0:
            if _world()[1]:
                idle(model)
            continue
        yield t, rows


def _on_policy_rows(flags, t, rows):
    """Per loss row of micro-batch t: does its trajectory train with ratio 1 (None: no flags)."""
    if not flags.numel():
        return None
    return flags[t["sequences"].cpu()[t["seq_index"][rows].cpu().long()]].to(rows.device)


def _hidden_and_head(model, t, autocast):
    """One packed forward (under autocast when set): the final hidden states and the LM-head weight,
    both in the dtype the fused loss runs in."""
    with torch.autocast(t["input_ids"].device.type, dtype=autocast, enabled=autocast is not None):
        hidden, head = forward_with_head(model, t["input_ids"], t["position_ids"], t["cu_seqlens"])
    if autocast is not None:
        hidden, head = hidden.to(autocast), head.to(autocast)
    return hidden, head


# What the post-update probe reports (prefixed post_): the monitor's view of the new weights.
PROBE_METRICS = ("logprob_gap_mean", "clip_fraction", "intrusion_mean", "spike_count", "tokens_rl",
                 "control_confidence_mean", "tokens_rl_control_target")


@torch.no_grad()
def _probe(model, batches, device, loss_config, control_ids, global_tokens, global_seqs, flags, backend,
           autocast):
    """The fused op's metrics of the updated weights on this step's micro-batches, forward only,
    against the rollout log-probs (rows the update trained on-policy count as on-policy here too)."""
    metrics_list, weights, forwards = [], [], 0
    for t, rows in _loss_micro_batches(model, batches, device, idle_forward):
        hidden, head = _hidden_and_head(model, t, autocast)
        forwards += 1
        out = linear_policy_loss(
            hidden[rows], head, t["target_ids"][rows], kinds=t["kinds"][rows],
            advantages=t["advantages"][rows], old_logprobs=t["logprobs"][rows],
            control_ids=control_ids, config=dataclasses.replace(loss_config, kl_coef=0.0),
            seq_ids=t["seq_index"][rows], num_tokens=global_tokens, num_sequences=global_seqs,
            on_policy_rows=_on_policy_rows(flags, t, rows), backend=backend)
        metrics_list.append(out.metrics)
        weights.append(float(rows.numel()))
    return _combine(metrics_list, weights), forwards
