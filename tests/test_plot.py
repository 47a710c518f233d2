"""Run plots: the expected PNGs exist and are real images, events are drawn, missing metrics are
skipped, bad run dirs are clear errors, and several runs overlay into one figure."""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from fastrl.plot import main, plot_run, plot_runs
from fastrl.trainer.metrics_log import MetricsLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PANELS = {"reward.png", "format_errors.png", "control_tokens.png", "entropy.png", "lr.png",
              "optimization.png"}


def fake_run(run_dir, steps=60, collapse_at=40, events=True, seed=None):
    """A run that collapses: reward falls and control-token intrusion spikes after `collapse_at`."""
    rng = random.Random(seed)
    with MetricsLogger(run_dir, progress=False) as log:
        for s in range(1, steps + 1):
            bad = s >= collapse_at
            log.log(s, {
                "reward_mean": (0.2 + 0.01 * s if not bad else 0.1) + rng.gauss(0, 0.02),
                "success_rate": min(1.0, 0.1 + 0.012 * s) if not bad else 0.05,
                "format_error_rate": 0.02 if not bad else 0.6,
                "intrusion_mean": 1e-4 if not bad else 0.05, "intrusion_max": 1e-3 if not bad else 0.9,
                "control_confidence_mean": -0.05 if not bad else -2.0,
                "control_confidence_min": -0.5 if not bad else -9.0,
                "spike_count": 0 if not bad else rng.randint(5, 50),
                "entropy_mean": 0.8 - 0.005 * s, "entropy_control_mean": 0.1,
                "lr": 1e-6, "grad_norm": abs(rng.gauss(1, 0.3)), "clip_fraction": 0.05,
                "kl_mean": 1e-3 * s, "logprob_gap_mean": 0.01,
                "loss": float("nan") if s == collapse_at + 2 else rng.gauss(0, 1),
                "tokens_per_sec": 1000.0 + s,
            })
            if events and s == collapse_at - 3:
                log.event(s, "warning", "intrusion rising", intrusion_max=0.2)
            if events and s == collapse_at:
                log.event(s, "action", "lr halved")
            if events and s == collapse_at + 2:
                log.event(s, "skip", "non-finite loss")


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert w > 300 and h > 200
        return np.asarray(im.convert("RGB")).astype(int)


def has_color(img, rgb, tol=30, min_pixels=20):
    return int((np.abs(img - np.array(rgb)).sum(-1) < tol).sum()) >= min_pixels


TAB_RED = (214, 39, 40)


def test_plot_run_writes_all_panels(tmp_path):
    fake_run(tmp_path / "run", seed=random.randrange(1000))
    paths = plot_run(tmp_path / "run")
    assert {p.name for p in paths} == ALL_PANELS | {"other_metrics.png"}
    assert all(p.parent == tmp_path / "run" / "plots" for p in paths)
    for p in paths:
        assert_png(p)
    # the "action" event is drawn in red on a single-line panel; absent without events
    fake_run(tmp_path / "quiet", events=False)
    img = assert_png(tmp_path / "run" / "plots" / "format_errors.png")
    quiet = assert_png(plot_run(tmp_path / "quiet", tmp_path / "qplots")[1])
    assert has_color(img, TAB_RED) and not has_color(quiet, TAB_RED)


def test_missing_metrics_are_skipped(tmp_path):
    with MetricsLogger(tmp_path, progress=False) as log:
        for s in range(5):
            log.log(s, {"reward_mean": s / 5, "lr": 1e-6 * (s + 1)})
        log.event(2, "warning", "low reward")
    paths = plot_run(tmp_path, tmp_path / "out")
    assert [p.name for p in paths] == ["reward.png", "lr.png"]
    for p in paths:
        assert_png(p)


def test_bad_run_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        plot_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no metrics"):
        plot_run(tmp_path)


def test_plot_runs_overlay(tmp_path, capsys):
    fake_run(tmp_path / "sync", collapse_at=30)
    fake_run(tmp_path / "interleaved", collapse_at=10_000, events=False)
    out = plot_runs([tmp_path / "sync", tmp_path / "interleaved"], ["sync", "interleaved"],
                    tmp_path / "report" / "drill.png",
                    keys=["reward_mean", "intrusion_max", "format_error_rate", "not_logged"])
    img = assert_png(out)
    assert img.shape[1] > 800    # two columns
    with pytest.raises(ValueError, match="2 run dirs but 1 labels"):
        plot_runs([tmp_path / "sync", tmp_path / "interleaved"], ["a"], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="missing"):
        plot_runs([tmp_path / "sync", tmp_path / "missing"], None, tmp_path / "x.png")
    main([str(tmp_path / "sync"), str(tmp_path / "interleaved"), "--out", str(tmp_path / "c.png")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "c.png")
    assert_png(tmp_path / "c.png")


def test_sft_warmup_progress_events_are_drawn_once(tmp_path):
    """Hundreds of per-step warm-up events (all at step 0) collapse to the last one; monitor
    events stay, each of them."""
    from fastrl.plot import _load
    fake_run(tmp_path / "run", steps=12, collapse_at=6)
    n = random.randint(30, 80)
    with MetricsLogger(tmp_path / "run", progress=False) as log:
        for i in range(1, n + 1):
            log.event(0, "sft_warmup", f"SFT warm-up step {i}/{n}", echo=False)
    _, events = _load(tmp_path / "run")
    warm = [e for e in events if e["kind"] == "sft_warmup"]
    assert [e["message"] for e in warm] == [f"SFT warm-up step {n}/{n}"]
    assert sorted(e["kind"] for e in events) == ["action", "sft_warmup", "skip", "warning"]
