"""The row-statistics kernel (kernels/softmax_row_stats.py) against float64 PyTorch, with the
vocabulary split into segments (the default split is 1 at CPU test sizes, so force it here)."""
import pytest
import torch

from fastrl.kernels.softmax_row_stats import default_split, softmax_row_stats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: Triton runs in the interpreter


@pytest.mark.parametrize("n,v", [(1, 1000), (9, 1531), (4, 4099)])
@pytest.mark.parametrize("split", [1, 3, 5, 64])       # 64 > tiles: capped to non-empty segments
@pytest.mark.parametrize("block_v", [128, 256])
def test_segments_merge_to_float64_reference(n, v, split, block_v, gen):
    z = torch.randn(n, v, generator=gen) * (1 + 20 * torch.rand(n, 1, generator=gen))
    z[0] -= 60.0                                         # an all-negative row
    if n > 2:
        z[1, int(torch.randint(0, v, (1,), generator=gen))] += 80.0   # a peaked row
    y = torch.randint(0, v, (n,), generator=gen)
    y[-1] = v - 1                                        # target in the last partial tile
    tau = float(0.5 + torch.rand((), generator=gen))
    lse, ent, zy = softmax_row_stats(z.to(DEVICE), y.to(DEVICE), 1 / tau, block_v=block_v, split=split)
    zz = z.double() / tau
    log_p = torch.log_softmax(zz, 1)
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(zz, 1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ent.cpu().double(), -(log_p.exp() * log_p).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zy.cpu().double(), zz.gather(1, y[:, None])[:, 0], rtol=1e-6, atol=1e-5)


def test_default_split_fills_the_gpu_but_keeps_segments_long():
    assert default_split(1104, 151936, 1024) == 8
    assert default_split(8192, 151936, 1024) == 1
    assert default_split(1, 151936, 1024) == 16
    assert default_split(64, 1000, 256) == 1             # under 8 tiles of vocabulary: no split
