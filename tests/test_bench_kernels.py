"""The GPU benchmark script's candidates run and agree on CPU (so bench/kernels.py cannot rot)."""
import torch

from bench import kernels


def test_candidates_run_and_agree_on_cpu():
    inputs = kernels.make_inputs(24, 16, 300, torch.float32, "cpu", copies=2, seed=int(torch.randint(0, 2**31, ())))
    for mode in ("fwd", "fwd_bwd", "policy"):
        cands = kernels.make_candidates(mode, inputs, backend="torch")
        assert {"fastrl", "eager", "cublas_floor"} <= set(cands)
        if mode == "policy":   # liger-kernel is in the test extra: its baselines run too
            assert {"liger_fused_linear_ce", "liger_fused_linear_grpo"} <= set(cands)
        for name, fn in cands.items():
            if name != "torch_compile":      # compiling on a 2-core CPU costs minutes
                fn()
                kernels.clear_grads(inputs)
    b = inputs[1]   # candidates rotate: compare on one set directly
    with torch.no_grad():
        fused = kernels.make_candidates("fwd", [b], backend="torch")["fastrl"]()
        eager = kernels.eager_stats(b["x"], b["w"], b["y"], b["control"])
    for got, want in zip(fused[:3], eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The fused policy step's gradient equals the eager one on the same batch.
    grads = []
    for name in ("fastrl", "eager"):
        kernels.clear_grads([b])
        kernels.make_candidates("policy", [b], backend="torch")[name]()
        grads.append(b["x"].grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_markdown_table_lists_every_row():
    env = dict(gpu="X", driver="1", cuda="13", torch="2", triton="3", liger_kernel=None)
    rows = [dict(N=1, H=2, V=3, mode="fwd", impl="fastrl", flops_counted="2NHV", median_ms=1.0, x_floor=1.1,
                 tflops=5.0, peak_extra_gib=0.1, logprob_rel_error_vs_fp32=1e-3),
            dict(N=1, H=2, V=3, mode="fwd", impl="eager", flops_counted="2NHV", error="OOM")]
    table = kernels.to_markdown(env, rows)
    assert "| fastrl | 1.00 | 1.10 |" in table and "| eager | OOM |" in table
