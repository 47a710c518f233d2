"""pytest-benchmark microbenchmarks of the fused policy-loss step (CPU-sized; GPU: bench/kernels.py).
The triton backend runs on CUDA where present, else in the Triton interpreter at a tiny size."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

from bench.kernels import eager_policy_loss, make_inputs
from fastrl.ops import PolicyLossConfig, TokenKind, linear_policy_loss

N, H, V = 512, 256, 16384


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=gen)
    w = (torch.randn(V, H, generator=gen) * H ** -0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen)
    return dict(x=x, w=w, y=y, control=torch.arange(8) * 7, adv=torch.randn(N, generator=gen),
                old=-torch.rand(N, generator=gen) * 8, kinds=torch.full((N,), int(TokenKind.RL)))


def _fused(b, backend="torch"):
    x = b["x"].detach().requires_grad_()
    out = linear_policy_loss(x, b["w"], b["y"], kinds=b["kinds"], advantages=b["adv"],
                             old_logprobs=b["old"], control_ids=b["control"], config=PolicyLossConfig(),
                             backend=backend)
    out.loss.backward()
    b["w"].grad = None


def _eager(b):
    x = b["x"].detach().requires_grad_()
    eager_policy_loss(x, b["w"], b["y"], b["control"], b["adv"], b["old"]).backward()
    b["w"].grad = None


@pytest.mark.benchmark(group="policy_loss_step")
def test_policy_step_fastrl_torch_backend(benchmark, inputs):
    benchmark(_fused, inputs)


@pytest.mark.benchmark(group="policy_loss_step")
def test_policy_step_eager_materialised(benchmark, inputs):
    benchmark(_eager, inputs)


@pytest.mark.benchmark(group="policy_loss_step_triton")
def test_policy_step_fastrl_triton_backend(benchmark):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, h, v = (N, H, V) if dev == "cuda" else (16, 32, 1000)
    benchmark(_fused, make_inputs(n, h, v, torch.float32, dev, copies=1)[0], "triton")
