"""Group advantages and the collapse monitor."""
import numpy as np
import pytest

from fastrl.trainer.advantages import group_advantages
from fastrl.trainer.monitor import CollapseMonitor, MonitorConfig


def test_group_advantages_against_direct_formula():
    rng = np.random.default_rng()
    groups = rng.integers(0, 5, 40)
    rewards = rng.random(40)
    adv = group_advantages(rewards, groups)
    raw = group_advantages(rewards, groups, std_normalize=False)
    for g in np.unique(groups):
        idx = groups == g
        r = rewards[idx]
        np.testing.assert_allclose(raw[idx], r - r.mean(), rtol=1e-5, atol=1e-6)
        if len(r) > 1 and r.std() > 0:
            np.testing.assert_allclose(adv[idx], (r - r.mean()) / (r.std() + 1e-6), rtol=1e-4, atol=1e-5)
    same = group_advantages([1.0, 1.0, 1.0], [0, 0, 0])
    assert (same == 0).all()
    with pytest.raises(ValueError, match=r"rewards\[1\] = nan"):
        group_advantages([0.0, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="group ids"):
        group_advantages([0.0, 1.0], [0])


def healthy(rng):
    return dict(format_error_rate=0.0, intrusion_mean=0.01 + 0.002 * rng.random(), intrusion_max=0.1,
                spike_count=0, tokens_rl=500, tokens_rl_control_target=40,
                control_confidence_mean=-0.05 - 0.01 * rng.random(), entropy_mean=0.8 + 0.05 * rng.random())


def test_monitor_quiet_on_healthy_steps_and_fires_on_intrusion_rise():
    rng = np.random.default_rng()
    mon = CollapseMonitor(MonitorConfig())
    for _ in range(6):
        assert not mon.update(healthy(rng)).warning
    bad = healthy(rng) | {"intrusion_mean": 0.2}
    v = mon.update(bad)
    assert v.warning and not v.severe and any("intrusion_mean" in r for r in v.reasons)
    # Baseline was not polluted by the bad step.
    assert mon.baseline["intrusion_mean"] < 0.02


@pytest.mark.parametrize("key,value,word", [
    ("intrusion_max", 0.9, "intrusion_max"),
    ("spike_count", 50, "spike rate"),
    ("control_confidence_mean", -2.0, "control_confidence_mean"),
    ("format_error_rate", 0.6, "format_error_rate"),
])
def test_each_absolute_signal(key, value, word):
    rng = np.random.default_rng()
    mon = CollapseMonitor(MonitorConfig(max_intrusion=0.5))
    v = mon.update(healthy(rng) | {key: value})
    assert v.warning and any(word in r for r in v.reasons)
    assert v.severe == (key == "format_error_rate")


def test_patience_and_off_policy_and_state_roundtrip():
    rng = np.random.default_rng()
    mon = CollapseMonitor(MonitorConfig(patience=2))
    assert not mon.update(healthy(rng) | {"intrusion_max": 1.0}).warning    # off by default
    assert not mon.update(healthy(rng) | {"spike_count": 50}).warning
    assert mon.update(healthy(rng) | {"spike_count": 50}).warning
    clone = CollapseMonitor(MonitorConfig(patience=2))
    clone.load_state_dict(mon.state_dict())
    assert clone.state_dict() == mon.state_dict()
    off = CollapseMonitor(MonitorConfig(policy="off"))
    assert not off.update(healthy(rng) | {"format_error_rate": 1.0}).warning
    with pytest.raises(ValueError, match="monitor.policy"):
        MonitorConfig(policy="panic").validate()


def test_reward_drop_against_the_running_baseline():
    """Off by default; when set, a reward below ratio x the EMA of healthy steps' rewards warns,
    a reward just above it does not, and the bad step does not move the baseline."""
    rng = np.random.default_rng()
    rewards = 0.6 + 0.3 * rng.random(5)
    off, on = CollapseMonitor(MonitorConfig()), CollapseMonitor(MonitorConfig(reward_drop_ratio=0.5))
    for r in rewards:
        for mon in (off, on):
            assert not mon.update(healthy(rng) | {"reward_mean": float(r)}).warning
    expect = rewards[0]
    for r in rewards[1:]:
        expect = 0.7 * expect + 0.3 * r
    assert on.baseline["reward_mean"] == pytest.approx(expect)
    low = 0.5 * expect * (0.5 + 0.4 * rng.random())
    assert not off.update(healthy(rng) | {"reward_mean": low}).warning
    v = on.update(healthy(rng) | {"reward_mean": low})
    assert v.warning and not v.severe and any("reward_mean" in r for r in v.reasons)
    assert on.baseline["reward_mean"] == pytest.approx(expect)
    assert not on.update(healthy(rng) | {"reward_mean": 0.51 * expect}).warning
    with pytest.raises(ValueError, match="monitor.reward_drop_ratio"):
        MonitorConfig(reward_drop_ratio=1.5).validate()


def test_post_update_signals_are_severe_and_do_not_flag_the_rollouts():
    rng = np.random.default_rng()
    mon = CollapseMonitor(MonitorConfig(max_update_shift=0.2))
    for _ in range(3):
        v = mon.update(healthy(rng) | {"post_logprob_gap_mean": 0.001 * rng.random(), "post_spike_count": 1,
                                       "post_tokens_rl": 500})
        assert not v.warning
    shift = 0.2 + 0.5 * rng.random()
    v = mon.update(healthy(rng) | {"post_logprob_gap_mean": shift, "post_spike_count": 0, "post_tokens_rl": 500})
    assert v.warning and v.severe and not v.rollouts_flagged
    assert v.reasons == [f"post-update log-prob shift {shift:.3f} > 0.2"]
    v = mon.update(healthy(rng) | {"post_logprob_gap_mean": 0.0, "post_spike_count": 30, "post_tokens_rl": 500})
    assert v.warning and v.severe and "post-update spike rate 0.0600 > 0.02" in v.reasons
    # A rollout signal flags the rollouts (the weights of the step before); it is severe only
    # above the rollback format-error rate.
    v = mon.update(healthy(rng) | {"format_error_rate": 0.3})
    assert v.warning and v.rollouts_flagged and not v.severe
    with pytest.raises(ValueError, match="max_update_shift"):
        MonitorConfig(max_update_shift=0.0).validate()
