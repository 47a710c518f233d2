"""`fastrl demo --quick` and `fastrl demo --drill --quick` end to end: every phase runs, the
report and plots are written, and the effects point the right way where a short run can show
them (SFT lifts held-out success and RL keeps it; the monitor warns no later than the format
breaks, only the `stabilize` run acts, and it ends no worse than the unprotected run)."""
import json

from fastrl.demo import run_demo, run_drill
from fastrl.trainer.metrics_log import read_events, read_metrics


def test_quick_demo_writes_report_and_learns(tmp_path):
    summary = run_demo(tmp_path / "demo", quick=True)
    res = {phase: r["test"] for phase, r in summary["results"].items()}
    # SFT takes held-out success off zero (one-call tasks, 24 of them: ~80% on the reference run).
    assert res["before SFT"]["success"] == 0.0
    assert res["after SFT"]["success"] >= 0.4
    # Three RL steps at the demo's learning rate keep it (a strict rise is within the noise of 24
    # tasks; the full demo's numbers are in the README).
    assert res["after RL"]["success"] >= res["after SFT"]["success"] - 0.15
    assert res["after RL"]["format_error_rate"] <= 0.2
    run = tmp_path / "demo"
    report = (run / "report.md").read_text()
    for phase in ("before SFT", "after SFT", "after RL"):
        assert f"| {phase} |" in report
        assert set(summary["results"][phase]) == {"test", "content_shift", "format_shift"}
    assert json.loads((run / "summary.json").read_text())["steps"] == summary["steps"]
    assert (run / "plots" / "control_tokens.png").stat().st_size > 1000
    sft = [e["loss"] for e in read_events(run) if e["kind"] == "sft_warmup"]
    assert len(sft) == summary["sft_steps"]
    assert sum(sft[-5:]) / 5 < 0.5 * sum(sft[:5]) / 5        # SFT on expert trajectories learns
    rows = read_metrics(run)
    assert len(rows) == summary["steps"]
    assert all("intrusion_mean" in r and "control_confidence_mean" in r for r in rows)


def test_quick_drill_warns_before_the_format_breaks_and_only_b_acts(tmp_path):
    summary = run_drill(tmp_path / "drill", quick=True)
    root = tmp_path / "drill"
    events_a, events_b = read_events(root / "run_A"), read_events(root / "run_B")
    assert not [e for e in events_a if e["kind"] == "action"]          # A only monitors
    if summary["format_broken_step_A"] is not None:
        assert summary["warning_step_A"] is not None
        assert summary["warning_step_A"] <= summary["format_broken_step_A"]
    assert summary["warning_step_A"] is not None                       # the drill does provoke A
    assert [e for e in events_b if e["kind"] == "action"]              # B steps in
    # The stabilised run ends no worse than the unprotected one.
    assert summary["final"]["B"]["success"] >= summary["final"]["A"]["success"]
    assert (root / "drill.png").stat().st_size > 1000
    assert "first collapse warning" in (root / "report.md").read_text()
