"""pytest-benchmark microbenchmarks of linear_token_stats (CPU-sized; the GPU protocol is
bench/kernels.py). Run: make bench  (or pytest bench --benchmark-enable -o python_files='bench_*.py').
The triton backend runs on CUDA where present, else in the Triton interpreter at a tiny size (it
checks that the path runs; interpreter timings say nothing about GPU speed)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

from bench.kernels import eager_stats, make_inputs
from fastrl.ops import linear_token_stats

N, H, V = 512, 256, 16384


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * H ** -0.5
    y = torch.randint(0, V, (N,), generator=gen)
    return x, w, y, torch.arange(8) * 7


@pytest.mark.benchmark(group="token_stats_fwd")
def test_fwd_fastrl_torch_backend(benchmark, inputs):
    x, w, y, c = inputs
    with torch.no_grad():
        benchmark(linear_token_stats, x, w, y, control_ids=c, backend="torch")


@pytest.mark.benchmark(group="token_stats_fwd")
def test_fwd_eager_materialised(benchmark, inputs):
    x, w, y, c = inputs
    with torch.no_grad():
        benchmark(eager_stats, x, w, y, c)


@pytest.mark.benchmark(group="token_stats_fwd")
def test_fwd_bare_gemm(benchmark, inputs):
    x, w, _, _ = inputs
    benchmark(torch.matmul, x, w.T)


def _fused_fwd_bwd(x, w, y, c, backend="torch"):
    xx = x.detach().requires_grad_()
    out = linear_token_stats(xx, w, y, control_ids=c, backend=backend)
    (out.logprobs.sum() + out.entropy.sum()).backward()


def _eager_fwd_bwd(x, w, y, c):
    xx = x.detach().requires_grad_()
    logp, ent, _ = eager_stats(xx, w, y, c)
    (logp.sum() + ent.sum()).backward()


@pytest.mark.benchmark(group="token_stats_fwd_bwd")
def test_fwd_bwd_fastrl_torch_backend(benchmark, inputs):
    benchmark(_fused_fwd_bwd, *inputs)


@pytest.mark.benchmark(group="token_stats_fwd_bwd")
def test_fwd_bwd_eager_materialised(benchmark, inputs):
    benchmark(_eager_fwd_bwd, *inputs)


@pytest.mark.benchmark(group="token_stats_triton")
def test_fwd_bwd_fastrl_triton_backend(benchmark):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, h, v = (N, H, V) if dev == "cuda" else (16, 32, 1000)
    b = make_inputs(n, h, v, torch.float32, dev, copies=1)[0]
    benchmark(_fused_fwd_bwd, b["x"], b["w"].detach(), b["y"], b["control"], "triton")
