"""The `fastrl` command line.

    fastrl info                                   versions, compiled extension, CUDA devices
    fastrl train CONFIG [--set k=v ...] [--resume]
    fastrl eval CONFIG --checkpoint DIR [--set k=v ...]
    fastrl plot RUN_DIR [--out DIR]
    fastrl demo [--drill] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import fastrl

    print(json.dumps(fastrl.info(), indent=2))
    return 0


def _load(args):
    from fastrl.config import load_config
    from fastrl.trainer.config import TrainConfig

    return load_config(TrainConfig, args.config, args.set or [])


def _cmd_train(args: argparse.Namespace) -> int:
    from fastrl.trainer.grpo import train

    cfg = _load(args)
    summary = train(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fastrl.trainer.evaluation import evaluate_checkpoint

    cfg = _load(args)
    results = evaluate_checkpoint(cfg, args.checkpoint)
    print(json.dumps(results, indent=2))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from fastrl.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastrl.demo import run_demo, run_drill

    if args.drill:
        run_drill(args.out, quick=args.quick)
    else:
        run_demo(args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, compiled-extension status and CUDA devices").set_defaults(
        func=_cmd_info)

    p = sub.add_parser("train", help="GRPO with supervisory signals and the collapse monitor")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="success and format errors on held-out and shifted splits")
    p.add_argument("config")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint dir (run_dir/checkpoints/step_*) or an exported model dir")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="PNG plots of a run's metrics and monitor events")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/plots)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("demo", help="the whole method on a CPU in minutes (tiny model, offline)")
    p.add_argument("--drill", action="store_true", help="provoke a collapse: RL-only vs the stabilize policy")
    p.add_argument("--out", default=None, help="run directory (default runs/demo or runs/drill)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (what CI exercises)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:          # configuration and input errors: one clear line, no traceback
        from fastrl.config import ConfigError

        if isinstance(e, ConfigError):
            print(f"fastrl: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
