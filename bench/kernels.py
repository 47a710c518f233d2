"""GPU benchmark of the fused ops: the protocol below (modes, baselines, shapes, metrics).

    python -m bench.kernels                 # full sweep, writes bench/results/kernels_<gpu>.json + .md
    python -m bench.kernels --quick         # N=8192, H=4096, V=151936 only
    python -m bench.kernels --shapes 2048x1536x151936 --out DIR

Shapes: bf16, K=8 control ids, N in PROTOCOL_N x (H, V) in PROTOCOL_HV (--quick: N=8192,
H=4096, V=151936 only). Modes, each timed on its own with triton.testing.do_bench (median ms after
warm-up, input sets rotated so they exceed L2):
  fwd        forward-only statistics (old / reference log-probs)          FLOPs counted: 2NHV
  fwd_bwd    statistics forward + backward (recomputes logits)             FLOPs counted: 8NHV
             (fastrl; the materialising baselines and the floor do 6NHV and are counted so)
  policy     full fused policy-loss step: loss, dX, dW                     FLOPs counted: 6NHV
Baselines in the same run: eager PyTorch on materialised fp32 logits, torch.compile of it,
Liger-Kernel's fused linear cross entropy (when installed), and the floor: the bare cuBLAS GEMMs
(X W^T for fwd; X W^T + dZ W + dZ^T X for the others).
Peak extra memory = allocator high-water mark minus what was allocated before the call (inputs)
and minus the outputs it returns. Error = max |logp - logp_fp32| / max |logp_fp32| against an
fp32 reference computed from the same bf16 inputs.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from fastrl.ops import PolicyLossConfig, TokenKind, linear_policy_loss, linear_token_stats

lts = importlib.import_module("fastrl.ops.linear_token_stats")   # the module, not the function

PROTOCOL_N = [2048, 8192, 16384, 32768]
PROTOCOL_HV = [(1536, 151936), (3584, 152064), (4096, 151936), (4096, 131072)]
K_CONTROL = 8
FLOPS_PER_NHV = {"fwd": 2, "fwd_bwd": 8, "policy": 6}


# ------------------------------------------------------------------------------ candidates
def eager_stats(x, w, y, control, tau: float = 1.0):
    z = (x @ w.T).float() / tau
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(1, y[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy, log_p[:, control]


def eager_policy_loss(x, w, y, control, adv, old, eps=0.2):
    logp, entropy, _ = eager_stats(x, w, y, control)
    ratio = torch.exp(logp - old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)).mean()


def make_candidates(mode, inputs, backend):
    """name -> zero-arg callable for one timed call (inputs rotate between calls)."""
    it = {"i": 0}

    def pick():
        it["i"] = (it["i"] + 1) % len(inputs)
        return inputs[it["i"]]

    control = inputs[0]["control"]
    cfg = PolicyLossConfig(control_metrics=True)
    cands = {}
    if mode == "fwd":
        def fused():
            b = pick()
            with torch.no_grad():
                return linear_token_stats(b["x"], b["w"], b["y"], control_ids=control, backend=backend)

        def eager():
            b = pick()
            with torch.no_grad():
                return eager_stats(b["x"], b["w"], b["y"], control)

        compiled_fn = torch.compile(eager_stats, dynamic=False)

        def compiled():
            b = pick()
            with torch.no_grad():
                return compiled_fn(b["x"], b["w"], b["y"], control)

        def floor():
            b = pick()
            return b["x"] @ b["w"].T

        cands.update(fastrl=fused, eager=eager, torch_compile=compiled, cublas_floor=floor)
        # The other forward path of the triton backend, timed beside the default.
        other = "fused" if lts.TRITON_FORWARD == "gemm_chunks" else "gemm_chunks"

        def fused_other():
            default, lts.TRITON_FORWARD = lts.TRITON_FORWARD, other
            try:
                return fused()
            finally:
                lts.TRITON_FORWARD = default

        if backend == "triton":
            cands[f"fastrl_{other}"] = fused_other
    elif mode == "fwd_bwd":
        def fused():
            b = pick()
            out = linear_token_stats(b["x"], b["w"], b["y"], control_ids=control, backend=backend)
            (out.logprobs * b["g"]).sum().add_((out.entropy * b["g"]).sum()).backward()

        def eager():
            b = pick()
            logp, ent, _ = eager_stats(b["x"], b["w"], b["y"], control)
            ((logp + ent) * b["g"]).sum().backward()

        compiled_fn = torch.compile(eager_stats, dynamic=False)

        def compiled():
            b = pick()
            logp, ent, _ = compiled_fn(b["x"], b["w"], b["y"], control)
            ((logp + ent) * b["g"]).sum().backward()

        cands.update(fastrl=fused, eager=eager, torch_compile=compiled)
    else:
        def fused():
            b = pick()
            out = linear_policy_loss(b["x"], b["w"], b["y"], kinds=b["kinds"], advantages=b["adv"],
                                     old_logprobs=b["old"], control_ids=control, config=cfg,
                                     backend=backend)
            out.loss.backward()

        def eager():
            b = pick()
            eager_policy_loss(b["x"], b["w"], b["y"], control, b["adv"], b["old"]).backward()

        compiled_fn = torch.compile(eager_policy_loss, dynamic=False)

        def compiled():
            b = pick()
            compiled_fn(b["x"], b["w"], b["y"], control, b["adv"], b["old"]).backward()

        cands.update(fastrl=fused, eager=eager, torch_compile=compiled)
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger_ce = LigerFusedLinearCrossEntropyLoss()

            def liger():
                b = pick()
                liger_ce(b["w"], b["x"], b["y"]).backward()

            cands["liger_fused_linear_ce"] = liger
        except Exception:  # not installed: the row is simply absent
            pass
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            # Liger's chunked GRPO loss wants [B, T] batches and a per-sequence advantage: the N
            # tokens as sequences of 1024 (its chunks), on-policy ratio from old log-probs, no KL.
            grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo",
                                            compiled=torch.cuda.is_available())

            def liger_grpo():
                b = pick()
                n, h = b["x"].shape
                t = 1024 if n % 1024 == 0 else n
                out = grpo(b["x"].view(n // t, t, h), b["w"], b["y"].view(n // t, t),
                           torch.ones(n // t, t, device=b["x"].device), b["adv"][:: t].contiguous(),
                           old_per_token_logps=b["old"].view(n // t, t))
                (out[0] if isinstance(out, tuple) else out).backward()

            cands["liger_fused_linear_grpo"] = liger_grpo
        except Exception:  # not installed, or an older Liger without the chunked losses
            pass
    if mode != "fwd":
        def floor():
            b = pick()
            z = b["x"] @ b["w"].T
            dz = z  # stands in for the logit gradient: same shape and dtype
            return dz @ b["w"], dz.T @ b["x"]

        cands["cublas_floor"] = floor
    return cands


# ------------------------------------------------------------------------------ measurement
def make_inputs(n, h, v, dtype, device, copies, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(v, h, device=device, generator=gen, dtype=torch.float32) * h ** -0.5).to(dtype)
    w.requires_grad_(True)
    control = torch.randperm(v, device=device, generator=gen)[:K_CONTROL]
    sets = []
    for _ in range(copies):
        x = torch.randn(n, h, device=device, generator=gen, dtype=torch.float32).to(dtype).requires_grad_(True)
        y = torch.randint(0, v, (n,), device=device, generator=gen)
        sets.append(dict(x=x, w=w, y=y, control=control,
                         g=torch.randn(n, device=device, generator=gen),
                         adv=torch.randn(n, device=device, generator=gen),
                         old=-torch.rand(n, device=device, generator=gen) * 8,
                         kinds=torch.full((n,), int(TokenKind.RL), device=device)))
    return sets


def peak_extra_bytes(fn, inputs):
    """High-water mark minus inputs (allocated before) minus outputs (returned tensors, grads)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    outputs = 0
    for t in (out if isinstance(out, (tuple, list)) else [out]):
        if isinstance(t, torch.Tensor):
            outputs += t.numel() * t.element_size()
    for t in [b["x"].grad for b in inputs] + [inputs[0]["w"].grad]:
        if t is not None:
            outputs += t.numel() * t.element_size()
    return torch.cuda.max_memory_allocated() - before - outputs


def clear_grads(inputs):
    for b in inputs:
        b["x"].grad = None
    inputs[0]["w"].grad = None


def logprob_error(inputs, backend):
    b = inputs[0]
    with torch.no_grad():
        got = linear_token_stats(b["x"], b["w"], b["y"], backend=backend).logprobs
        ref = torch.cat([
            torch.log_softmax(b["x"][i:i + 1024].float() @ b["w"].float().T, -1)
            .gather(1, b["y"][i:i + 1024, None])[:, 0]
            for i in range(0, b["x"].shape[0], 1024)])
    return float((got - ref).abs().max() / ref.abs().max())


def run_shape(n, h, v, modes, backend, dtype, reps, impls=None):
    import triton

    device = "cuda"
    bytes_per_set = n * h * torch.finfo(dtype).bits // 8
    l2 = 64 << 20
    copies = max(2, min(8, -(-2 * l2 // bytes_per_set)))
    inputs = make_inputs(n, h, v, dtype, device, copies)
    rows = []
    for mode in modes:
        for name, fn in make_candidates(mode, inputs, backend).items():
            if impls and name not in impls:
                continue
            # FLOPs each candidate does: in fwd_bwd only fastrl recomputes the logits (8NHV); the
            # materialising baselines and the floor do three GEMMs (6NHV).
            per_nhv = 6 if (mode == "fwd_bwd" and not name.startswith("fastrl")) else FLOPS_PER_NHV[mode]
            row = dict(N=n, H=h, V=v, mode=mode, impl=name, flops_counted=f"{per_nhv}NHV")
            try:
                fn()
                clear_grads(inputs)
                row["peak_extra_gib"] = peak_extra_bytes(fn, inputs) / 2**30
                clear_grads(inputs)
                ms = triton.testing.do_bench(lambda: (fn(), clear_grads(inputs)), warmup=25, rep=reps,
                                             return_mode="median")
                row["median_ms"] = ms
                row["tflops"] = per_nhv * n * h * v / (ms * 1e-3) / 1e12
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
            except Exception as e:  # a baseline that cannot run here is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            clear_grads(inputs)
            torch.cuda.empty_cache()
            rows.append(row)
    for row in rows:
        if row["impl"] == "fastrl" and row["mode"] == "fwd":
            row["logprob_rel_error_vs_fp32"] = logprob_error(inputs, backend)
    floors = {r["mode"]: r.get("median_ms") for r in rows if r["impl"] == "cublas_floor"}
    for row in rows:
        if row.get("median_ms") and floors.get(row["mode"]):
            row["x_floor"] = row["median_ms"] / floors[row["mode"]]
    return rows


def tune_stats_fwd(n, h, v, dtype, reps):
    """Time every CUDA_CANDIDATES tile config of the forward stats kernel at one shape; set the
    fastest as CUDA_CONFIG for the rest of this run and return all timings (floor included)."""
    import triton

    from fastrl.kernels import linear_token_stats as k

    b = make_inputs(n, h, v, dtype, "cuda", 1)[0]
    x, w, y = b["x"].detach(), b["w"].detach(), b["y"]
    floor = triton.testing.do_bench(lambda: x @ w.T, warmup=25, rep=reps, return_mode="median")
    results = []
    for cfg in k.CUDA_CANDIDATES:
        row = dict(config=cfg)
        try:
            ms = triton.testing.do_bench(lambda: k.linear_stats_fwd(x, w, y, 1.0, **cfg), warmup=25,
                                         rep=reps, return_mode="median")
            row.update(median_ms=ms, x_floor=ms / floor)
        except Exception as e:  # e.g. out of shared memory for this tile on this GPU
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        print(row, flush=True)
        results.append(row)
    ok = [r for r in results if "median_ms" in r]
    if ok:
        k.CUDA_CONFIG.clear()
        k.CUDA_CONFIG.update(min(ok, key=lambda r: r["median_ms"])["config"])
    return dict(N=n, H=h, V=v, floor_ms=floor, candidates=results, chosen=dict(k.CUDA_CONFIG))


def policy_breakdown(n, h, v, dtype, reps, workspace_bytes=lts.DEFAULT_WORKSPACE_BYTES, device="cuda"):
    """Time each piece of one token chunk of the policy-loss step (the chunk the default workspace
    gives) and scale by the number of chunks: where the step's time goes, beside the bare GEMMs."""
    import triton

    from fastrl.kernels.logits_grad import logits_grad
    from fastrl.kernels.softmax_row_stats import softmax_row_stats

    b = make_inputs(n, h, v, dtype, device, 1)[0]
    x, w, y = b["x"].detach(), b["w"].detach(), b["y"]
    buf = lts.weight_grad_buffer(w, workspace_bytes)
    rows = lts.rows_per_chunk(v, 4 + x.element_size(), lts.chunk_workspace(w, buf, workspace_bytes))
    rows = min(rows, n)
    chunks = -(-n // rows)
    xc, yc = x[:rows], y[:rows]
    logits = lts.logits_fp32(xc, w)
    lse, ent, _ = softmax_row_stats(logits, yc, 1.0)
    a, bb, gy = torch.randn_like(lse), torch.randn_like(lse), torch.randn_like(lse)
    dz = logits_grad(logits, lse, a, bb, yc, gy, 1.0, out=torch.empty_like(logits, dtype=dtype))
    dw32 = torch.zeros(w.shape, dtype=torch.float32, device=device)
    pieces = {
        "gemm_logits_fp32_out": lambda: lts.logits_fp32(xc, w),
        "gemm_logits_bf16_out": lambda: xc @ w.T,
        "row_stats_kernel": lambda: softmax_row_stats(logits, yc, 1.0),
        "row_stats_split1": lambda: softmax_row_stats(logits, yc, 1.0, split=1),
        "row_stats_split4": lambda: softmax_row_stats(logits, yc, 1.0, split=4),
        "row_stats_split16": lambda: softmax_row_stats(logits, yc, 1.0, split=16),
        "row_stats_bv2048_w8": lambda: softmax_row_stats(logits, yc, 1.0, 2048, 8),
        "row_stats_bv512_w2": lambda: softmax_row_stats(logits, yc, 1.0, 512, 2),
        "torch_logsumexp": lambda: torch.logsumexp(logits, dim=1),
        "logits_grad_kernel": lambda: logits_grad(logits, lse, a, bb, yc, gy, 1.0, out=dz),
        "gemm_dx": lambda: dz @ w,
        f"dw_accumulate_{str(buf.dtype).replace('torch.', '')}": lambda: lts.accumulate_weight_grad(buf, dz, xc),
        "dw_accumulate_float32": lambda: lts.accumulate_weight_grad(dw32, dz, xc),
        "gemm_dw_no_accumulate": lambda: dz.T @ xc,
    }
    out = dict(N=n, H=h, V=v, rows_per_chunk=rows, chunks=chunks, ms_whole_batch={})
    for name, fn in pieces.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median") if reps else (fn(), 0.0)[1]
        out["ms_whole_batch"][name] = ms * chunks
    print(out, flush=True)
    return out


def profile_policy_step(n, h, v, dtype, out_dir, steps=3):
    """torch.profiler over a few fastrl policy-loss steps: GPU time per kernel against the wall
    time, and the host syncs (aten::_local_scalar_dense, cudaStreamSynchronize) per step."""
    from torch.profiler import ProfilerActivity, profile

    inputs = make_inputs(n, h, v, dtype, "cuda", 1)
    fn = make_candidates("policy", inputs, "triton")["fastrl"]
    for _ in range(2):
        fn(), clear_grads(inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn(), clear_grads(inputs)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / steps
    syncs = {e.key: e.count / steps for e in events
             if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")}
    table = events.table(sort_by="self_device_time_total", row_limit=30)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "profile_policy.txt").write_text(
        f"N={n} H={h} V={v}: wall {wall_ms:.2f} ms/step, GPU kernels {gpu_ms:.2f} ms/step, "
        f"syncs/step {syncs}\n\n{table}\n")
    summary = dict(N=n, H=h, V=v, wall_ms_per_step=wall_ms, gpu_kernel_ms_per_step=gpu_ms,
                   syncs_per_step=syncs)
    print(summary, flush=True)
    return summary


def environment():
    import triton

    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:
        pass
    env = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               driver=driver, cuda=torch.version.cuda, torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = None
    return env


def to_markdown(env, rows):
    lines = [f"GPU: {env['gpu']} (driver {env['driver']}, CUDA {env['cuda']}), torch {env['torch']}, "
             f"triton {env['triton']}, liger-kernel {env['liger_kernel']}", "",
             "| N | H | V | mode | impl | median ms | x floor | TFLOPS (count) | peak extra GiB | logp rel err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['N']} | {r['H']} | {r['V']} | {r['mode']} | {r['impl']} | {r['error']} | | | | |")
            continue
        err = r.get("logprob_rel_error_vs_fp32")
        lines.append(f"| {r['N']} | {r['H']} | {r['V']} | {r['mode']} | {r['impl']} | {r['median_ms']:.2f} | "
                     f"{r.get('x_floor', float('nan')):.2f} | {r['tflops']:.0f} ({r['flops_counted']}) | "
                     f"{r['peak_extra_gib']:.2f} | {'' if err is None else f'{err:.1e}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only N=8192, H=4096, V=151936")
    parser.add_argument("--shapes", nargs="*", help="NxHxV triples, overriding the protocol sweep")
    parser.add_argument("--modes", nargs="*", default=["fwd", "fwd_bwd", "policy"])
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench measurement window per case")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tune", action="store_true",
                        help="first time the forward kernel's tile configs at the first shape, use the fastest")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--impls", nargs="*", help="only these candidates (e.g. fastrl cublas_floor)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the pieces of the policy-loss step at the first shape")
    parser.add_argument("--profile", action="store_true",
                        help="also profile fastrl's policy-loss step at the first shape (profile_policy.txt)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels needs a CUDA GPU (CPU microbenchmarks: make bench)")
    if args.shapes:
        shapes = [tuple(int(s) for s in spec.split("x")) for spec in args.shapes]
    elif args.quick:
        shapes = [(8192, 4096, 151936)]
    else:
        shapes = [(n, h, v) for (h, v) in PROTOCOL_HV for n in PROTOCOL_N]
    env = environment()
    from fastrl.kernels import linear_token_stats as stats_kernel

    if args.tune:
        env["tune"] = tune_stats_fwd(*shapes[0], torch.bfloat16, args.rep_ms)
    env["stats_fwd_config"] = dict(stats_kernel.CUDA_CONFIG)
    env["triton_forward_default"] = lts.TRITON_FORWARD
    if args.breakdown:
        env["policy_breakdown"] = policy_breakdown(*shapes[0], torch.bfloat16, args.rep_ms)
    if args.profile:
        env["policy_profile"] = profile_policy_step(*shapes[0], torch.bfloat16, args.out)
    rows = []
    for n, h, v in shapes:
        print(f"== N={n} H={h} V={v}", flush=True)
        rows += run_shape(n, h, v, args.modes, args.backend, torch.bfloat16, args.rep_ms, args.impls)
        print(to_markdown(env, [r for r in rows if (r["N"], r["H"], r["V"]) == (n, h, v)]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = (env["gpu"] or "gpu").lower().replace(" ", "_") + args.tag
    (out / f"kernels_{tag}.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    (out / f"kernels_{tag}.md").write_text(to_markdown(env, rows))
    print(f"wrote {out}/kernels_{tag}.json and .md")


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(".scratch/inductor").absolute()))
    main()
