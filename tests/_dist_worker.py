"""One policy_update step on this rank's share of a seeded global batch; used by test_distributed.

    torchrun --nproc_per_node 2 tests/_dist_worker.py OUT_DIR SEED [fsdp]   (each rank its shard)
    import _dist_worker; _dist_worker.run_step(SEED)                         (one process, whole batch)

`fsdp` shards the model with FSDP2 (gloo) and runs policy_update on it (forward_with_head, FSDP's
summed reduce-scatter instead of an all-reduce, idle passes for a rank out of micro-batches).

Everything random comes from SEED, so every process builds the same batch and the same initial
model. Each rank saves what it saw and the parameters after the step to OUT_DIR/rank{R}.pt.
"""
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import transformers

import fastrl.trainer.update as update_module
from fastrl.data import Trajectory
from fastrl.ops import PolicyLossConfig, TokenKind
from fastrl.trainer.distributed import (cleanup, full_state_dict, init_distributed, is_sharded, shard_trajectories,
                                        wrap_model)
from fastrl.trainer.checkpoint import export_pretrained, gather_train_state, latest_checkpoint, load_checkpoint, save_checkpoint
from fastrl.trainer.update import policy_update

VOCAB = 61
CONTROL = [57, 58, 59]
LR = 0.5
GRAD_CLIP = 0.05         # small enough to clip: clipping must use the global gradient norm
ADAM_LR = 1e-2
MICRO_BATCH_TOKENS = 64  # above the longest sequence (50), below a rank's share: several micro-batches
LOSS_CONFIG = PolicyLossConfig(entropy_coef=0.01, sft_weight=0.5, unlikelihood_weight=0.3)


def build_model(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                   attn_implementation="eager")
    return transformers.Qwen2ForCausalLM(cfg).float()


def build_batch(seed: int, n: int = 7):
    """Trajectories of quite different lengths (so the balance matters), with RL, SFT (an expert)
    and unlikelihood rows, and per-trajectory on-policy flags."""
    rng = np.random.default_rng(seed + 1)
    trajs, on_policy = [], []
    for i in range(n):
        expert = i == n - 1
        t = Trajectory(is_expert=expert, task_id=f"task{i}", group_id=i // 3)
        t.add_prompt(rng.integers(0, VOCAB, rng.integers(2, 12)))
        for turn in range(rng.integers(1, 4)):
            ids = rng.integers(0, VOCAB, rng.integers(1, 9))
            ids[-1] = CONTROL[turn % len(CONTROL)]
            kinds = None
            if i == 0 and turn == 0:   # a malformed control token, trained away from
                kinds = np.full(len(ids), int(TokenKind.RL), np.int8)
                kinds[-1] = TokenKind.UNLIKELIHOOD
            t.add_assistant(ids, None if expert else rng.normal(-3.0, 0.7, len(ids)), kinds=kinds)
            t.add_observation(rng.integers(0, VOCAB, rng.integers(1, 6)))
        t.advantage = float(rng.normal())
        trajs.append(t)
        on_policy.append(bool(i % 4 == 1))
    return trajs, on_policy


def run_step(seed: int, info=None) -> dict:
    """One SGD step of policy_update; with `info` from torchrun, on this rank's shard only."""
    trajs, on_policy = build_batch(seed)
    model = build_model(seed)
    indices = list(range(len(trajs)))
    plans = None
    if info is not None and info.enabled:
        # Every rank computes the whole plan so the test can check the ranks agree.
        plans = [shard_trajectories(trajs, r, info.world_size)[1] for r in range(info.world_size)]
        trajs, indices = shard_trajectories(trajs, info.rank, info.world_size)
        on_policy = [on_policy[i] for i in indices]
        model = wrap_model(model, info)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    result = policy_update(model, trajs, optimizer=opt, loss_config=LOSS_CONFIG, control_ids=CONTROL,
                           micro_batch_tokens=MICRO_BATCH_TOKENS, grad_clip=GRAD_CLIP, on_policy=on_policy)
    return {"loss": result.loss, "grad_norm": result.grad_norm, "skipped": result.skipped,
            "loss_tokens": result.metrics["loss_tokens"], "indices": indices, "plans": plans,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def fsdp_step(seed: int, info=None) -> dict:
    """One policy_update SGD step: with `info` from torchrun on an FSDP2-sharded model and this
    rank's shard, else plainly on the whole batch. Returns the loss, the global gradient norm, the
    micro-batch counts (own, passes run including idle ones) and the full weights after the step.

    Rank 0 packs everything into one micro-batch and the others into one per sequence (the loss
    does not depend on packing), so the ranks have different micro-batch counts to pad."""
    trajs, _ = build_batch(seed)
    model = build_model(seed)
    budget = MICRO_BATCH_TOKENS
    if info is not None and info.enabled:
        trajs, _ = shard_trajectories(trajs, info.rank, info.world_size)
        model = wrap_model(model, info, shard=True)   # CUDA under nccl: moves the model there
        assert is_sharded(model)
        budget = 4096 if info.rank == 0 else max(len(t) for t in trajs)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # Count the idle passes (a rank out of micro-batches pads with them so FSDP's collectives pair
    # up) through the trainer's own idle_forward_backward.
    with mock.patch.object(update_module, "idle_forward_backward",
                           wraps=update_module.idle_forward_backward) as idle:
        result = policy_update(model, trajs, optimizer=opt, loss_config=LOSS_CONFIG, control_ids=CONTROL,
                               micro_batch_tokens=budget, grad_clip=GRAD_CLIP)
    assert not result.skipped
    micro_batches = (result.metrics["micro_batches"], result.forward_passes + idle.call_count)
    return {"loss": result.loss, "grad_norm": result.grad_norm, "micro_batches": micro_batches,
            "rank0_only_keys": len(full_state_dict(model)),
            "params": {k: v.detach().cpu().clone() for k, v in full_state_dict(model, rank0_only=False).items()}}


def adam_step(model, opt, trajs, budget: int = MICRO_BATCH_TOKENS) -> None:
    result = policy_update(model, trajs, optimizer=opt, loss_config=LOSS_CONFIG, control_ids=CONTROL,
                           micro_batch_tokens=budget)
    assert not result.skipped


def fsdp_checkpoint(seed: int, info, out_dir: str) -> dict:
    """An AdamW step on a sharded model, a checkpoint and an export of it, then a second sharded
    model (other initial weights, fresh optimizer) restored from the checkpoint; both take one
    more identical step. Returns the weights after the restore and after those steps."""
    trajs, _ = build_batch(seed)
    mine, _ = shard_trajectories(trajs, info.rank, info.world_size)
    model = wrap_model(build_model(seed), info, shard=True)
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM_LR)
    adam_step(model, opt, mine)
    weights, optim = gather_train_state(model, opt)
    full = full_state_dict(model)
    if info.rank == 0:
        save_checkpoint(out_dir, 1, model=model, optimizer=opt, model_state=weights, optimizer_state=optim)
        export_pretrained(model, None, Path(out_dir) / "export", state_dict=full)
    dist.barrier()
    other = wrap_model(build_model(seed + 1), info, shard=True)
    opt2 = torch.optim.AdamW(other.parameters(), lr=ADAM_LR)
    load_checkpoint(latest_checkpoint(out_dir), model=other, optimizer=opt2, restore_rng=False)
    restored = full_state_dict(other, rank0_only=False)
    adam_step(model, opt, mine)
    adam_step(other, opt2, mine)
    cpu = lambda sd: {k: v.detach().cpu().clone() for k, v in sd.items()}  # noqa: E731
    return {"restored": cpu(restored), "after_original": cpu(full_state_dict(model, rank0_only=False)),
            "after_restored": cpu(full_state_dict(other, rank0_only=False))}


def main(out_dir: str, seed: int, mode: str = "ddp") -> None:
    info = init_distributed(timeout_s=60)
    try:
        if mode == "fsdp_checkpoint":
            out = fsdp_checkpoint(seed, info, out_dir)
        else:
            out = (fsdp_step if mode == "fsdp" else run_step)(seed, info)
        out["world_size"] = info.world_size
        torch.save(out, Path(out_dir) / f"rank{info.rank}.pt")
    finally:
        cleanup()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
