"""Compiled (fastrl._C) vs pure-Python data path, in one run.

    python -m bench.bench_data [--sequences 100000] [--group 64] [--step-sequences 2000]
                               [--repeats 3]

Lengths are drawn uniformly from 50 to 8,000 tokens; every op runs on all sequences (100,000
hold ~400M tokens, ~7 GB as a store). Packed tensors are built for every micro-batch of the
packing plan, `--group` micro-batches per call (about one training step's worth), each group
dropped once built, as a trainer consumes them. A further row times what a trainer calls each
step, `pack_micro_batches` on a store of `--step-sequences`, over 4 such steps. The scan covers
all tokens in one call. Both implementations must give identical results (checked on every
group outside the timing). The compiled backend uses FASTRL_NUM_THREADS threads (default: the
cores, at most 8). The build rows also time a bare copy of the build's bytes (torch copy_/fill_ on
as many threads, no per-sequence work): how far any implementation could go. Prints a Markdown
table and writes bench/results/data_cpu.json with the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import fastrl
from fastrl.data import (SequenceStore, balance_partitions, build_packed_batches,
                         control_token_mask, pack_micro_batches, pack_sequences, turn_boundaries)
from fastrl.data._impl import compiled

RESULTS = Path(__file__).parent / "results" / "data_cpu.json"
TOKEN_BUDGET = 32768
NUM_PARTS = 8
VOCAB = 151_936          # Qwen2.5's vocabulary size
NUM_CONTROL_IDS = 8


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def random_store(rng, lengths) -> SequenceStore:
    """Trajectory-like sequences: an IGNORE prompt, then alternating RL turns and observations."""
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    kinds = np.zeros(total, np.int8)
    for start, length in zip(offsets[:-1], lengths):
        cut = np.sort(rng.integers(1, length, size=4)) if length > 4 else [1, 1, 1, 1]
        kinds[start + cut[0]:start + cut[1]] = 1
        kinds[start + cut[2]:start + cut[3]] = 1
    logprobs = np.where(kinds > 0, -rng.random(total, dtype=np.float32), 0).astype(np.float32)
    advantages = np.where(kinds > 0, rng.standard_normal(total, dtype=np.float32), 0)
    return SequenceStore(token_ids=rng.integers(0, VOCAB, size=total, dtype=np.int64),
                         kinds=kinds, logprobs=logprobs,
                         advantages=advantages.astype(np.float32), offsets=offsets)


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if hasattr(a, "__dataclass_fields__"):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def bare_copy(stores: list[SequenceStore], chunk: int):
    """The build's memory traffic without its per-sequence work, as a yardstick for the build
    rows: each store's four arrays copied `chunk` tokens at a time into recycled buffers, and the
    three arrays the build computes (targets, positions, sequence index) written, by torch's
    multi-threaded copy_/fill_. Same bytes as the build (17 read and 37 written per token), so
    python_ms / bare_ms is about the most any implementation of the build could gain here."""
    src = [[torch.from_numpy(a) for a in (s.token_ids, s.kinds, s.logprobs, s.advantages)]
           for s in stores]
    copied = [torch.empty(chunk, dtype=a.dtype) for a in src[0]]
    written = [torch.empty(chunk, dtype=d) for d in (torch.int64, torch.int64, torch.int32)]

    def run():
        for arrays in src:
            for start in range(0, len(arrays[0]), chunk):
                n = min(chunk, len(arrays[0]) - start)
                for out, a in zip(copied, arrays):
                    out[:n].copy_(a[start:start + n])
                for out in written:
                    out[:n].fill_(1)
    return run


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "fastrl": fastrl.__version__,
            "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=100_000)
    parser.add_argument("--group", type=int, default=64, help="micro-batches per build call")
    parser.add_argument("--step-sequences", type=int, default=2_000,
                        help="sequences per trainer step in the per-step row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    ext = compiled()
    if ext is None:
        raise SystemExit("fastrl._C is not built: pip install -e . first")

    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(50, 8001, size=args.sequences)
    store = random_store(rng, lengths)
    plan = pack_sequences(lengths, TOKEN_BUDGET)
    groups = [plan[i:i + args.group] for i in range(0, len(plan), args.group)]
    control_ids = rng.choice(VOCAB, size=NUM_CONTROL_IDS, replace=False)
    # Sprinkle control tokens so the scan finds some (~1%).
    hits = np.flatnonzero(rng.random(len(store.token_ids)) < 0.01)
    store.token_ids[hits] = rng.choice(control_ids, size=len(hits))
    del hits

    def build(impl):
        for group in groups:  # each group's batches are dropped once built
            build_packed_batches(store, group, VOCAB, impl=impl)

    # A trainer's view: each step packs and builds its own store (here 4 steps of --step-sequences)
    # and drops the batches before the next step.
    steps = [random_store(rng, rng.integers(50, 8001, size=args.step_sequences)) for _ in range(4)]

    def train_steps(impl):
        for step in steps:
            batches = pack_micro_batches(step, TOKEN_BUDGET, VOCAB, impl=impl)
        return batches  # the last step's, for the parity check

    def scan(impl):
        return (control_token_mask(store.token_ids, control_ids, VOCAB, impl=impl),
                turn_boundaries(store.kinds, store.offsets, impl=impl))

    for group in groups:  # parity outside the timing
        if not same(build_packed_batches(store, group, VOCAB, impl="cpp"),
                    build_packed_batches(store, group, VOCAB, impl="python")):
            raise SystemExit("build_packed_batches: compiled and Python results differ")

    n, tokens = len(lengths), int(lengths.sum())
    ops = [
        ("pack_sequences", f"{n:,} seqs, budget {TOKEN_BUDGET}",
         lambda impl: pack_sequences(lengths, TOKEN_BUDGET, impl=impl)),
        ("balance_partitions", f"{n:,} seqs, {NUM_PARTS} parts",
         lambda impl: balance_partitions(lengths, NUM_PARTS, impl=impl)),
        ("build_packed_batches", f"{n:,} seqs ({tokens / 1e6:.0f}M tokens), {len(plan):,} "
         f"micro-batches, {args.group} per call", build),
        ("pack_micro_batches, per step", f"{args.step_sequences:,} seqs "
         f"({steps[0].lengths.sum() / 1e6:.0f}M tokens) per step, 4 steps", train_steps),
        ("control scan", f"{n:,} seqs ({tokens / 1e6:.0f}M tokens), {NUM_CONTROL_IDS} control ids"
         " + turn boundaries", scan),
    ]
    # The yardstick for the build rows runs on as many threads as the compiled backend.
    threads = ext.max_threads()
    torch.set_num_threads(threads)
    yardsticks = {"build_packed_batches": bare_copy([store], args.group * TOKEN_BUDGET),
                  "pack_micro_batches, per step": bare_copy(steps, max(s.lengths.sum()
                                                                       for s in steps))}
    rows = []
    for name, size, fn in ops:
        cpp_s, cpp_out = best_time(lambda: fn("cpp"), args.repeats)
        py_s, py_out = best_time(lambda: fn("python"), args.repeats)
        if not same(cpp_out, py_out):
            raise SystemExit(f"{name}: compiled and Python results differ")
        del cpp_out, py_out
        row = {"op": name, "size": size, "cpp_ms": cpp_s * 1e3, "python_ms": py_s * 1e3,
               "speedup": py_s / cpp_s}
        if name in yardsticks:
            bare_s, _ = best_time(yardsticks[name], args.repeats)
            row.update(bare_copy_ms=bare_s * 1e3, python_over_bare_copy=py_s / bare_s)
        rows.append(row)
        print(f"{name}: cpp {cpp_s * 1e3:.1f} ms, python {py_s * 1e3:.1f} ms", flush=True)

    table = ["| op | size | compiled (ms) | pure Python (ms) | speedup | bare copy (ms) | "
             "pure Python / bare copy |", "|---|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['op']} | {r['size']} | {r['cpp_ms']:.1f} | {r['python_ms']:.1f} | "
              f"{r['speedup']:.1f}x | " + (f"{r['bare_copy_ms']:.1f} | "
                                           f"{r['python_over_bare_copy']:.1f}x |"
                                           if "bare_copy_ms" in r else "- | - |") for r in rows]
    info = machine_info()
    info["compiled_threads"] = threads
    note = (f"Lengths uniform in [50, 8000], {n:,} sequences ({tokens / 1e6:.0f}M tokens). Best of "
            f"{args.repeats} runs. CPU: {info['cpu']}, {info['cores']} cores; the compiled "
            f"backend ran on {threads} thread{'s' * (threads != 1)}. The Python twins of build and "
            "scan are numpy-vectorised and these ops are memory-bound, so their compiled "
            "speedup is bounded by memory bandwidth, not by the interpreter. Bare copy moves "
            "the build's bytes with torch's copy_/fill_ on as many threads and no per-sequence "
            "work; pure Python / bare copy is about the most any build could gain here.")
    print("\n" + "\n".join(table) + "\n\n" + note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "data path: compiled vs pure Python", "machine": info,
        "config": {"sequences": n, "length_range": [50, 8000], "tokens": tokens,
                   "token_budget": TOKEN_BUDGET, "micro_batches": len(plan),
                   "micro_batches_per_build_call": args.group,
                   "step_sequences": args.step_sequences, "num_parts": NUM_PARTS,
                   "vocab_size": VOCAB, "control_ids": NUM_CONTROL_IDS,
                   "repeats": args.repeats, "seed": args.seed},
        "results": rows, "note": note,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
