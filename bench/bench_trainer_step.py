"""Per-step time breakdown of the GRPO recipe on the CPU example config.

    python -m bench.bench_trainer_step [--steps 3] [--engine auto] [--set key=value ...]

Runs a few RL steps of configs/synthetic_cpu.yaml (no SFT warm-up, fresh tiny model) and prints
where each step's time goes: rollout, reward + supervision, forward/backward, optimizer, weight
sync (and interleaved SFT phases when configured). The same numbers are in every run's
metrics.jsonl as time_* keys.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

PHASES = ["time_rollout", "time_reward_supervision", "time_forward_backward", "time_optimizer", "time_sync",
          "time_sft_phase"]


def main(argv=None) -> None:
    from fastrl.config import load_config
    from fastrl.trainer.config import TrainConfig
    from fastrl.trainer.grpo import train
    from fastrl.trainer.metrics_log import read_metrics

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    config = Path(__file__).resolve().parent.parent / "configs" / "synthetic_cpu.yaml"
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(TrainConfig, config, [f"run_dir={run_dir}", f"steps={args.steps}", "sft_warmup_steps=0",
                                                "checkpoint_every=0", "progress=false",
                                                f"rollout.engine={args.engine}", *args.set])
        train(cfg)
        rows = read_metrics(run_dir)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| step | " + " | ".join(p.removeprefix("time_") for p in PHASES) + " | total s | tokens/s trained |")
    print("|---" * (len(PHASES) + 3) + "|")
    for r in rows:
        times = [r.get(p, 0.0) for p in PHASES]
        total = sum(times)
        print(f"| {r['step']} | " + " | ".join(f"{t:.2f}" for t in times) +
              f" | {total:.2f} | {r['loss_tokens'] / max(r['time_forward_backward'], 1e-9):.0f} |")
    if args.json:
        args.json.write_text(json.dumps([{k: r.get(k) for k in ["step", "loss_tokens", *PHASES]} for r in rows],
                                        indent=1))


if __name__ == "__main__":
    main()
