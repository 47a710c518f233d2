"""PNG plots of a run (metrics.jsonl + events.jsonl), and overlays of several runs.

    plot_run("runs/grpo_1")                       # -> runs/grpo_1/plots/*.png
    plot_runs(["runs/a", "runs/b"], ["sync", "interleaved"], "drill.png")
    python -m fastrl.plot runs/grpo_1 [runs/other ...] [--out DIR]

Monitor events are drawn on every plot as vertical lines (warning: orange dashed, action: red,
skip: grey dotted), labelled on the top axis, so a collapse can be read against what the monitor
saw and did. Metrics a run did not log are left out; a panel with none of its metrics is skipped.
Figures are built with matplotlib's object API (no pyplot, no global backend switch).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Sequence

from fastrl.trainer.metrics_log import METRICS_FILE, read_events, read_metrics

# panel file name -> (title, axes); each axis is (y label, [(metric key, legend label)], log-y)
PANELS: dict[str, tuple[str, list[tuple[str, list[tuple[str, str]], bool]]]] = {
    "reward": ("Reward and success", [
        ("reward / success", [("reward_mean", "reward (mean)"),
                              ("success_rate", "success rate")], False)]),
    "format_errors": ("Format-error rate", [
        ("format-error rate", [("format_error_rate", "format-error rate")], False)]),
    "control_tokens": ("Control-token statistics", [
        ("intrusion p_ctrl", [("intrusion_mean", "intrusion mean"),
                              ("intrusion_max", "intrusion max")], True),  # spans decades
        ("logp(control target)", [("control_confidence_mean", "control confidence mean"),
                                  ("control_confidence_min", "control confidence min")], False),
        ("spikes", [("spike_count", "spike count")], False)]),
    "entropy": ("Entropy", [
        ("entropy (nats)", [("entropy_mean", "all tokens"),
                            ("entropy_control_mean", "control positions")], False)]),
    "lr": ("Learning rate", [("lr", [("lr", "lr")], True)]),
    "optimization": ("Optimisation", [
        ("loss", [("loss", "loss")], False),
        ("grad norm", [("grad_norm", "grad norm")], False),
        ("kl / logprob gap", [("kl_mean", "KL mean"),
                              ("logprob_gap_mean", "rollout-trainer logprob gap")], False),
        ("clip fraction", [("clip_fraction", "clip fraction")], False)]),
}
DEFAULT_COMPARE_KEYS = ("reward_mean", "success_rate", "format_error_rate", "intrusion_max",
                        "control_confidence_mean", "entropy_mean")
EVENT_STYLE = {"warning": ("tab:orange", "--"), "action": ("tab:red", "-"),
               "skip": ("tab:gray", ":")}
_OTHER_EVENT = ("tab:purple", "-.")
_MAX_EVENT_LABELS = 25   # beyond this the labels overlap into an unreadable block


def _figure(**kw):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib (pip install matplotlib)") from e
    return Figure(**kw)


def _load(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in run directory {run_dir}")
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / METRICS_FILE} has no metrics yet")
    # one record per step (the last wins: a run resumed without truncation repeats steps)
    by_step = {int(r["step"]): r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)], _drop_progress(read_events(run_dir))


# Progress events (one per SFT warm-up step, all at step 0) are drawn once, the last of each kind:
# hundreds of labels on one line are unreadable.
PROGRESS_KINDS = ("sft_warmup",)


def _drop_progress(events: list[dict]) -> list[dict]:
    last = {e["kind"]: i for i, e in enumerate(events) if e.get("kind") in PROGRESS_KINDS}
    return [e for i, e in enumerate(events) if e.get("kind") not in PROGRESS_KINDS or last[e["kind"]] == i]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]] | None:
    """(steps, values) of a scalar metric; None when the run never logged it. Missing or
    non-numeric values become NaN (a gap in the line)."""
    if not any(key in r for r in records):
        return None
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        xs.append(r["step"])
        ys.append(float(v) if ok else math.nan)
    return xs, ys


def _mark_events(ax, events: list[dict], label: bool, color: str | None = None) -> None:
    for i, e in enumerate(events):
        c, ls = EVENT_STYLE.get(e.get("kind"), _OTHER_EVENT)
        ax.axvline(e["step"], color=color or c, linestyle=ls, linewidth=1.0, alpha=0.7)
        if label and i < _MAX_EVENT_LABELS:
            text = f"{e.get('kind', '?')}: {e.get('message', '')}"
            ax.text(e["step"], 0.98, text[:40], transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="right", fontsize=6, color=c, alpha=0.9)


def _event_legend_handles(events: list[dict]):
    from matplotlib.lines import Line2D
    kinds = sorted({e.get("kind", "?") for e in events})
    return [Line2D([], [], color=EVENT_STYLE.get(k, _OTHER_EVENT)[0],
                   linestyle=EVENT_STYLE.get(k, _OTHER_EVENT)[1], label=f"event: {k}")
            for k in kinds]


def _plot_panel(records, events, title, axes_spec, out_path: Path) -> bool:
    present = []
    for ylabel, keys, logy in axes_spec:
        lines = [(label, s) for key, label in keys if (s := _series(records, key)) is not None]
        if lines:
            present.append((ylabel, lines, logy))
    if not present:
        return False
    fig = _figure(figsize=(9, 2.2 + 2.0 * len(present)), layout="constrained")
    axs = fig.subplots(len(present), 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, (ylabel, lines, logy)) in enumerate(zip(axs, present)):
        for label, (xs, ys) in lines:
            ax.plot(xs, ys, label=label, linewidth=1.4, marker="." if len(xs) <= 60 else None)
        if logy and all(y > 0 for _, (_, ys) in lines for y in ys if not math.isnan(y)):
            ax.set_yscale("log")
        _mark_events(ax, events, label=(i == 0))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if i == 0:
            handles += _event_legend_handles(events)
        ax.legend(handles=handles, fontsize=7, loc="best")
    axs[-1].set_xlabel("step")
    fig.suptitle(title)
    fig.savefig(out_path, dpi=110)
    return True


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write one PNG per panel (reward, format errors, control tokens, entropy, lr,
    optimisation, and any other numeric metrics) with monitor events marked. Returns the files."""
    records, events = _load(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, axes_spec) in PANELS.items():
        path = out / f"{name}.png"
        if _plot_panel(records, events, title, axes_spec, path):
            written.append(path)
    # metrics outside the known panels still get seen (one small axis each, up to 12)
    known = {k for _, spec in PANELS.values() for _, keys, _ in spec for k, _ in keys}
    others = sorted({k for r in records for k, v in r.items()
                     if k not in known and k not in ("step", "time")
                     and isinstance(v, (int, float)) and not isinstance(v, bool)})[:12]
    if others:
        spec = [(k, [(k, k)], False) for k in others]
        path = out / "other_metrics.png"
        if _plot_panel(records, events, "Other metrics", spec, path):
            written.append(path)
    return written


def plot_runs(run_dirs: Sequence[str | os.PathLike], labels: Sequence[str] | None,
              out_path: str | os.PathLike, keys: Sequence[str] = DEFAULT_COMPARE_KEYS) -> Path:
    """Overlay several runs, one axis per metric key, each run's events marked in its colour
    (for side-by-side drill reports). A key no run logged shows an empty, labelled axis."""
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    labels = [Path(d).name for d in run_dirs] if labels is None else list(labels)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(run_dirs)} run dirs but {len(labels)} labels")
    if not keys:
        raise ValueError("plot_runs needs at least one metric key")
    runs = [_load(d) for d in run_dirs]
    ncols = 2 if len(keys) > 1 else 1
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(figsize=(6.5 * ncols, 3.0 * nrows), layout="constrained")
    axs = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axs, keys):
        any_data = False
        for (records, events), label, color in zip(runs, labels, colors):
            s = _series(records, key)
            if s is None:
                continue
            any_data = True
            ax.plot(*s, label=label, color=color, linewidth=1.4)
            _mark_events(ax, events, label=False, color=color)
        if not any_data:
            ax.text(0.5, 0.5, f"no run logged {key}", transform=ax.transAxes,
                    ha="center", va="center", color="gray")
        else:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axs[len(keys):]:
        ax.set_visible(False)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return out_path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastrl.plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", help="output dir (one run) or PNG path (several runs)")
    p.add_argument("--labels", nargs="*")
    p.add_argument("--keys", nargs="*", default=list(DEFAULT_COMPARE_KEYS))
    args = p.parse_args(argv)
    if len(args.run_dirs) == 1:
        for path in plot_run(args.run_dirs[0], args.out):
            print(path)
    else:
        print(plot_runs(args.run_dirs, args.labels, args.out or "compare.png", args.keys))


if __name__ == "__main__":
    main()
