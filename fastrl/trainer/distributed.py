"""Data-parallel training over torch.distributed, launched by `torchrun`.

    torchrun --nproc_per_node N -m fastrl train ...

Every rank holds the same global batch of trajectories (rank 0 rolls out and broadcasts them, or
every rank rolls out the same seeded tasks), takes its balanced share with `shard_trajectories`,
and calls `policy_update` on it. policy_update normalises the loss by the GLOBAL loss-token count
(all-reduced), so the per-rank gradients add up to the single-process gradient of the whole batch:
on CPU (gloo) policy_update sums them with an all-reduce; on CUDA with FSDP2 (`wrap_model`) the
reduce-scatter of fully_shard sums them (see `wrap_model` for what policy_update must do then).

Outside torchrun every function here is a no-op for one process, so the same code runs alone.
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastrl.data import balance_partitions
from fastrl.data.packed_forward import packed_forward

# The name under which wrap_model installs the FSDP-aware forward on a sharded model.
FORWARD_METHOD = "fastrl_forward_with_head"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    enabled: bool            # a process group is initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RuntimeError(f"torchrun environment: {name}={value!r} is not an integer") from None


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    nccl with one GPU per local rank when CUDA is available, gloo on CPU. Without torchrun's
    variables it returns single-process info (rank 0 of 1, nothing initialised). Idempotent.
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"),
                        False)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not: launch with torchrun")
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), init_method="env://", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device, True)


def cleanup() -> None:
    """Leave the process group (after the last collective); a no-op when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_trajectories(trajectories, rank: int, world_size: int):
    """This rank's share of the global batch: `(my_trajectories, my_indices)`.

    Sequences are balanced by token length (Karmarkar-Karp, `balance_partitions`), so the ranks
    wait on each other as little as possible. The plan depends only on the lengths, so every rank
    computes the same one without communicating; indices are ascending within a share. Shard after
    the group advantages are computed (they need the whole group), and slice per-trajectory lists
    such as policy_update's `on_policy` with `my_indices`.
    """
    n = len(trajectories)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} ranks")
    if n < world_size:
        raise ValueError(f"{n} trajectories cannot be shared over {world_size} ranks: every rank needs at least "
                         "one (raise the rollout batch or use fewer ranks)")
    parts = balance_partitions([len(t) for t in trajectories], world_size)
    mine = list(parts[rank])
    return [trajectories[i] for i in mine], mine


def _alone() -> bool:
    # No group, or a group of one (in-process vLLM initialises one for itself).
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled), e.g. rank 0's rollouts; identity when alone."""
    if _alone():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --- FSDP2 ------------------------------------------------------------------------------------

def _fsdp2():
    """The FSDP2 namespace (fully_shard, FSDPModule, ...): torch < 2.6 has it under _composable."""
    import torch.distributed.fsdp as fsdp
    if hasattr(fsdp, "fully_shard"):
        return fsdp
    import torch.distributed._composable.fsdp as fsdp
    return fsdp


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks: the classes HF lists as never to be split, else `base_model.layers`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = list(getattr(model.base_model, "layers", []))
    if not layers:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers to shard")
    return layers


def _forward_with_head(self, input_ids, position_ids, cu_seqlens):
    """Installed on a sharded model. FSDP runs its pre-forward around it, so the root parameters
    (embeddings, final norm, LM head) are gathered while the head weight is taken and used."""
    hidden = packed_forward(self, input_ids, position_ids, cu_seqlens).hidden_states
    return hidden, self.get_output_embeddings().weight


def is_sharded(model) -> bool:
    """True for a model wrapped by FSDP2 (`wrap_model` with sharding)."""
    return hasattr(model, FORWARD_METHOD)


def forward_with_head(model, input_ids, position_ids, cu_seqlens):
    """`(hidden_states, lm_head_weight)` of a packed micro-batch, sharded or not.

    policy_update computes the loss from the hidden states and the head weight outside the model's
    forward (the fused loss never materialises logits). With FSDP2 the head weight only exists
    in full inside a forward of the root module, so a sharded model goes through the forward
    method `wrap_model` registered with FSDP; a plain model is used directly.
    """
    if is_sharded(model):
        return getattr(model, FORWARD_METHOD)(input_ids, position_ids, cu_seqlens)
    return packed_forward(model, input_ids, position_ids, cu_seqlens).hidden_states, \
        model.get_output_embeddings().weight


def global_micro_batches(local: int, device=None) -> int:
    """The most micro-batches any rank has this step (`local` when alone). With FSDP every forward
    and backward is a collective, so every rank must run this many; see `idle_forward_backward`."""
    if _alone():
        return local
    t = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def idle_forward(model):
    """A one-token forward, for a rank with fewer micro-batches than the others (or one without
    loss rows): it takes part in FSDP's all-gathers so the other ranks do not wait on it forever."""
    device = next(model.parameters()).device
    one = torch.zeros(1, dtype=torch.long, device=device)
    return forward_with_head(model, one, one, torch.tensor([0, 1], dtype=torch.int32, device=device))


def idle_forward_backward(model) -> None:
    """`idle_forward` and a backward that adds nothing to any gradient (FSDP's reduce-scatters)."""
    hidden, head = idle_forward(model)
    (hidden.sum() * 0 + head.sum() * 0).backward()


def wrap_model(model, info: DistInfo, *, shard: bool | None = None, mp_policy=None):
    """Prepare `model` for data-parallel training; call it before building the optimizer.

    shard=None shards on CUDA with more than one rank; on CPU/gloo the model comes back unchanged
    and policy_update all-reduces (sums) the full gradients itself, DDP-style. shard=True forces
    FSDP2 (also on CPU with gloo, which is how the tests check it).

    Sharding applies FSDP2 `fully_shard` to every decoder layer, then to the root (embeddings,
    final norm, LM head: tied weights stay one parameter), with the gradient divide factor set to 1
    and sum-only collectives, so the reduce-scatter SUMS gradients (FSDP's default is the mean),
    matching the global-token normalisation of the loss.
    Then FSDP does the gradient reduction, and policy_update must:
      * get hidden states and the head weight from `forward_with_head` (not packed_forward plus
        `model.get_output_embeddings().weight` read before the forward: that is the sharded DTensor);
      * skip its own gradient all-reduce (`is_sharded(model)`): each rank's `.grad` is its shard,
        already summed over ranks; all-reducing it again would multiply by the world size;
      * run the same number of forward/backward passes on every rank: each is a collective, so a
        rank with fewer micro-batches (or a micro-batch without loss rows, now skipped with
        `continue`) pads with `idle_forward_backward` up to `global_micro_batches(len(batches))`,
        or the ranks deadlock;
      * still all-reduce the loss and the token counts (those are plain tensors).
    clip_grad_norm_ over the DTensor gradients computes the global norm; its result is a DTensor
    (`.full_tensor()` before `float`). A sharded model's `state_dict()` is shards: use
    `full_state_dict` for the rollout engine and checkpoints.
    """
    if shard is None:
        shard = info.enabled and info.world_size > 1 and info.device.type == "cuda"
    if not shard:
        return model
    if not info.enabled:
        raise RuntimeError("wrap_model(shard=True) needs an initialised process group "
                           "(init_distributed under torchrun)")
    from torch.distributed.device_mesh import init_device_mesh
    fsdp = _fsdp2()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs = dict(mesh=mesh, mp_policy=mp_policy or fsdp.MixedPrecisionPolicy())
    model.to(info.device)
    for layer in _decoder_layers(model):
        fsdp.fully_shard(layer, **kwargs)
    fsdp.fully_shard(model, **kwargs)
    for m in model.modules():
        if isinstance(m, fsdp.FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)   # plain SUM: gloo has no PREMUL_SUM
    setattr(model, FORWARD_METHOD, types.MethodType(_forward_with_head, model))
    fsdp.register_fsdp_forward_method(model, FORWARD_METHOD)
    return model


def full_state_dict(model, rank0_only: bool = True) -> dict:
    """The whole model's weights, gathered from the shards (a collective: call it on every rank).

    rank0_only: rank 0 gets them on CPU and the other ranks an empty dict (the rollout engine
    and checkpoints live with rank 0); False gives every rank the full weights on its device.
    An unsharded model's own state_dict() on every rank.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_only))
