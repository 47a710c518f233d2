"""Data parallel: two gloo processes under torchrun, each on its balanced share of a global batch,
finish one policy_update step with the same loss and the same parameters as one process on the
whole batch. Plus the sharding plan (every index once, balanced, the same on every rank)."""
import itertools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _dist_worker
from fastrl.trainer.distributed import (broadcast_object, init_distributed, is_sharded, shard_trajectories,
                                        wrap_model)

WORKER = Path(__file__).with_name("_dist_worker.py")
TIMEOUT_S = 180   # a hung collective fails the test instead of blocking CI


@pytest.fixture
def seed():
    s = int.from_bytes(os.urandom(4), "little") >> 1
    print("seed", s)
    return s


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(out_dir: Path, seed: int, *args: str, nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_loopback_port()),
           str(WORKER), str(out_dir), str(seed), *args]
    # Loopback only; one thread per rank on shared cores.
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)   # its own process group: a timeout kills the ranks too
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{output[-4000:]}"


def test_two_gloo_ranks_match_one_process(tmp_path, seed):
    run_torchrun(tmp_path, seed)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _dist_worker.run_step(seed)
    n = len(single["indices"])

    # The ranks agree on the plan and took disjoint shares covering the batch.
    assert ranks[0]["plans"] == ranks[1]["plans"]
    assert [r["indices"] for r in ranks] == ranks[0]["plans"]
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == list(range(n))
    assert all(r["world_size"] == 2 and not r["skipped"] for r in ranks) and not single["skipped"]

    for r in ranks:
        assert r["loss_tokens"] == single["loss_tokens"]       # the global count, not the shard's
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-7)
        assert r["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert single["grad_norm"] > _dist_worker.GRAD_CLIP        # the step was clipped, by the global norm

    initial = dict(_dist_worker.build_model(seed).named_parameters())
    moved = max((single["params"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3, "the step did not move the parameters: the comparison would prove nothing"
    for r in ranks:
        assert r["params"].keys() == single["params"].keys()
        for k, p in single["params"].items():
            torch.testing.assert_close(r["params"][k], p, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_fsdp2_sharded_ranks_match_one_process(tmp_path, seed):
    """wrap_model's FSDP2 contract, checked on CPU with gloo: the head weight comes through
    forward_with_head, the reduce-scatter sums (not averages) rank gradients, tied weights stay
    tied, ranks with fewer micro-batches pad with idle passes, and full_state_dict gathers the
    weights after a step."""
    run_torchrun(tmp_path, seed, "fsdp")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _dist_worker.fsdp_step(seed)
    assert single["grad_norm"] > _dist_worker.GRAD_CLIP
    assert ranks[0]["rank0_only_keys"] == len(single["params"]) and ranks[1]["rank0_only_keys"] == 0
    # Rank 0 had fewer micro-batches and padded up to the other rank's count.
    (own0, steps0), (own1, steps1) = ranks[0]["micro_batches"], ranks[1]["micro_batches"]
    assert own0 < own1 and steps0 == steps1 == own1
    for r in ranks:
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-7)
        assert r["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
        assert r["params"].keys() == single["params"].keys()
        for k, p in single["params"].items():
            torch.testing.assert_close(r["params"][k], p, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(r["params"]["lm_head.weight"], r["params"]["model.embed_tokens.weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 over nccl needs a CUDA device")
def test_fsdp2_on_cuda_with_nccl_matches_one_cpu_process(tmp_path, seed):
    """The CUDA path of wrap_model: fully_shard over an nccl mesh (one rank: one GPU cannot host
    two nccl ranks), the fused loss on CUDA through forward_with_head, clipping over DTensor
    gradients, full_state_dict gathering from CUDA shards; the same step as one CPU process."""
    run_torchrun(tmp_path, seed, "fsdp", nproc=1)
    rank = torch.load(tmp_path / "rank0.pt", weights_only=False)
    single = _dist_worker.fsdp_step(seed)
    assert rank["world_size"] == 1 and single["grad_norm"] > _dist_worker.GRAD_CLIP
    assert rank["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-6)
    assert rank["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert rank["params"].keys() == single["params"].keys()
    for k, p in single["params"].items():
        torch.testing.assert_close(rank["params"][k], p, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_fsdp2_checkpoint_and_export_round_trip(tmp_path, seed):
    """A sharded run's checkpoint restores weights and AdamW state into other shards (the next
    step matches the uninterrupted run), loads into one unsharded process (whose step on the whole
    batch matches too), and its export loads with from_pretrained."""
    run_torchrun(tmp_path, seed, "fsdp_checkpoint")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    initial = dict(_dist_worker.build_model(seed + 1).named_parameters())
    for r in ranks:
        moved = max((r["restored"][k] - initial[k]).abs().max().item() for k in initial)
        assert moved > 1e-3, "the restore did not change the second model: the check would prove nothing"
        for k, p in ranks[0]["after_original"].items():
            torch.testing.assert_close(r["after_restored"][k], p, rtol=0, atol=1e-6,
                                       msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(r["restored"], ranks[0]["restored"], rtol=0, atol=0)

    # One process, unsharded: same weights, and the optimizer state makes the same next step.
    from fastrl.trainer.checkpoint import latest_checkpoint, load_checkpoint
    model = _dist_worker.build_model(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=_dist_worker.ADAM_LR)
    load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt, restore_rng=False)
    for k, p in model.state_dict().items():
        torch.testing.assert_close(p, ranks[0]["restored"][k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert model.lm_head.weight is model.model.embed_tokens.weight        # still tied
    trajs, _ = _dist_worker.build_batch(seed)
    _dist_worker.adam_step(model, opt, trajs)
    for k, p in model.state_dict().items():
        torch.testing.assert_close(p, ranks[0]["after_original"][k], rtol=0, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}")

    import transformers
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for k, p in exported.state_dict().items():
        torch.testing.assert_close(p, ranks[0]["restored"][k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


class _Seq:
    """A stand-in trajectory: shard_trajectories only needs its length."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _optimum(lengths, k):
    """The smallest possible largest part, by brute force (small inputs only)."""
    best = sum(lengths)
    for assign in itertools.product(range(k), repeat=len(lengths) - 1):
        sums = [0] * k
        sums[0] = lengths[0]     # symmetry: the first item goes to part 0
        for x, a in zip(lengths[1:], assign):
            sums[a] += x
        best = min(best, max(sums))
    return best


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_plan_is_a_balanced_partition_agreed_by_every_rank(seed, world):
    rng = np.random.default_rng(seed + world)
    for trial in range(20):
        n = int(rng.integers(world, 10))
        lengths = [int(x) for x in rng.integers(1, 200, n)]
        trajs = [_Seq(x) for x in lengths]
        shares = [shard_trajectories(trajs, r, world) for r in range(world)]
        again = [shard_trajectories(list(trajs), r, world) for r in reversed(range(world))][::-1]
        assert [s[1] for s in shares] == [s[1] for s in again]          # deterministic
        assert sorted(i for _, idx in shares for i in idx) == list(range(n))
        for mine, idx in shares:
            assert idx == sorted(idx) and len(idx) >= 1
            assert [t.n for t in mine] == [lengths[i] for i in idx]
        sums = [sum(lengths[i] for i in idx) for _, idx in shares]
        # Largest differencing never leaves parts further apart than the longest sequence,
        # and is within 4/3 of the best possible largest part.
        assert max(sums) - min(sums) <= max(lengths), (lengths, sums)
        assert max(sums) * 3 <= 4 * _optimum(lengths, world), (lengths, sums)


def test_too_few_trajectories_is_an_error_naming_the_counts():
    with pytest.raises(ValueError, match=r"3 trajectories cannot be shared over 4 ranks"):
        shard_trajectories([_Seq(5)] * 3, 0, 4)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        shard_trajectories([_Seq(5)] * 3, 2, 2)


def test_without_torchrun_everything_is_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)
    obj = {"a": [1, 2]}
    assert broadcast_object(obj) is obj
    model = _dist_worker.build_model(0)
    assert wrap_model(model, info) is model and not is_sharded(model)
    with pytest.raises(RuntimeError, match="initialised process group"):
        wrap_model(model, info, shard=True)
