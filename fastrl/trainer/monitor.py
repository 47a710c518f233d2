"""The collapse monitor: reads per-step control-token statistics and says when a collapse is coming.

A collapse shows up in the control-token statistics before the format breaks: probability mass
moves onto control tokens at positions where they do not belong (intrusion, spikes), and the
model gets less sure of the control tokens where they do belong (control confidence). The
detector checks each step against

  absolute thresholds   format_error_rate > max_format_error_rate
                        intrusion_max     > max_intrusion (off by default, see below)
                        spike_count / tokens_rl > max_spike_rate
                        control_confidence_mean < min_control_confidence (nats)
  a running baseline    intrusion_mean > intrusion_ratio * baseline and > intrusion_floor
  (EMA over healthy     control_confidence_mean < baseline - confidence_drop
   steps, after         entropy_mean > entropy_ratio * baseline
   warmup_steps)        reward_mean < reward_drop_ratio * baseline (off by default)

`max_intrusion` is off by default: a maximum over thousands of sampled tokens saturates in a
healthy run of a confident model (at temperature 1 some rollout samples a digit where the model put
~all its mass on `</answer>`), so it fires every step; the mean and the spike rate do not.
`reward_drop_ratio` is off by default too: it catches a run whose format holds while its answers
go wrong (the drill's run A ends with 1% format errors and 0% success), but the reward of a small
group at temperature 1 swings by a third from step to step, so the ratio has to suit the task.

With `post_update_probe` the trainer also measures the weights it just produced, forward only, on
the step's own batch (fastrl.trainer.update, `post_*` metrics), and two more signals judge them:

  post-update           post_logprob_gap_mean > max_update_shift (mean |log p_new - log p_rollout|
  (the new weights)     of the sampled tokens after one update)
                        post spike rate > max_spike_rate

These see an update that has already broken the control tokens before the next rollouts sample
from it; the rollout-based signals see it one step later, when the format has broken. Measured on
the demo's SFT'd tiny model: at the demo's learning rate one update moves the sampled tokens'
log-probs by 1e-4 to 1.4e-3 nats on average; at the drill's 35x, by 0.6 nats in the update that
breaks the format (100% format errors at the next step's rollouts).

The monitor raises `collapse_warning` after `patience` consecutive steps with at least one signal. A
warning with format_error_rate above `rollback_format_error_rate`, or from a post-update signal,
is `severe` (under `stabilize` it rolls back to the last confirmed checkpoint). The trainer acts
on the verdict according to `policy` (off | monitor | stabilize); see fastrl.trainer.grpo.
Under `stabilize` every warning multiplies the LR by `warning_lr_factor`, or by
`rollback_lr_factor` when it rolls back, never below `min_lr_scale` of the configured LR: a warning says the updates
are already moving the control-token distribution too far, and the LR that got the run there would
take it there again after a rollback.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class MonitorConfig:
    policy: str = "monitor"                 # "off" | "monitor" | "stabilize"
    max_format_error_rate: float = 0.25
    max_intrusion: float | None = None      # None: off (see the module docstring)
    max_spike_rate: float = 0.02
    min_control_confidence: float = -1.0
    intrusion_ratio: float = 4.0
    intrusion_floor: float = 0.02
    confidence_drop: float = 0.5
    entropy_ratio: float = 2.5
    reward_drop_ratio: float | None = None  # None: off (see the module docstring)
    post_update_probe: bool = False         # measure the new weights after each RL update (one
                                            # forward-only pass per micro-batch)
    max_update_shift: float = 0.2           # nats: post_logprob_gap_mean above this is a signal
    baseline_decay: float = 0.7             # EMA weight of the old baseline
    warmup_steps: int = 2
    patience: int = 1
    # stabilize actions
    sft_weight_on_warning: float = 0.5      # synchronous expert-SFT weight while warned
    interleave_sft_steps: int = 2           # SFT steps on erroneous tasks right after a warning
    warning_lr_factor: float = 1.0          # LR multiplier per warning (1.0: leave the LR alone)
    min_lr_scale: float = 0.05              # floor of the product of all LR cuts
    rollback_format_error_rate: float = 0.5
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 2

    def validate(self) -> None:
        if self.policy not in ("off", "monitor", "stabilize"):
            raise ValueError(f"monitor.policy must be 'off', 'monitor' or 'stabilize', got {self.policy!r}")
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(f"monitor.baseline_decay must be in [0, 1), got {self.baseline_decay}")
        for name in ("warning_lr_factor", "rollback_lr_factor", "min_lr_scale"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"monitor.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.reward_drop_ratio is not None and not 0 < self.reward_drop_ratio < 1:
            raise ValueError(f"monitor.reward_drop_ratio must be in (0, 1) or null, got {self.reward_drop_ratio}")
        if self.patience < 1:
            raise ValueError(f"monitor.patience must be >= 1, got {self.patience}")
        if not self.max_update_shift > 0:
            raise ValueError(f"monitor.max_update_shift must be > 0, got {self.max_update_shift}")


@dataclass
class Verdict:
    warning: bool
    severe: bool
    reasons: list[str] = field(default_factory=list)
    # True when a signal came from this step's rollouts (they judge the weights of the step
    # before); False when only the post-update probe (the weights after this step) fired.
    rollouts_flagged: bool = True


BASELINE_KEYS = ("intrusion_mean", "control_confidence_mean", "entropy_mean", "reward_mean")


@dataclass
class CollapseMonitor:
    config: MonitorConfig
    baseline: dict = field(default_factory=dict)
    healthy_steps: int = 0
    streak: int = 0
    warnings: int = 0

    def signals(self, m: dict) -> list[str]:
        c, out = self.config, []
        get = lambda k: m.get(k)  # noqa: E731
        if get("format_error_rate") is not None and m["format_error_rate"] > c.max_format_error_rate:
            out.append(f"format_error_rate {m['format_error_rate']:.3f} > {c.max_format_error_rate}")
        if c.max_intrusion is not None and get("intrusion_max") is not None \
                and m["intrusion_max"] > c.max_intrusion:
            out.append(f"intrusion_max {m['intrusion_max']:.3f} > {c.max_intrusion}")
        if get("spike_count") is not None and m.get("tokens_rl"):
            rate = m["spike_count"] / m["tokens_rl"]
            if rate > c.max_spike_rate:
                out.append(f"spike rate {rate:.4f} > {c.max_spike_rate}")
        if m.get("tokens_rl_control_target") and get("control_confidence_mean") is not None \
                and m["control_confidence_mean"] < c.min_control_confidence:
            out.append(f"control_confidence_mean {m['control_confidence_mean']:.3f} < {c.min_control_confidence}")
        if self.healthy_steps >= c.warmup_steps:
            b = self.baseline
            if get("intrusion_mean") is not None and "intrusion_mean" in b and \
                    m["intrusion_mean"] > max(c.intrusion_ratio * b["intrusion_mean"], c.intrusion_floor):
                out.append(f"intrusion_mean {m['intrusion_mean']:.4f} > {c.intrusion_ratio}x baseline "
                           f"{b['intrusion_mean']:.4f}")
            if m.get("tokens_rl_control_target") and get("control_confidence_mean") is not None \
                    and "control_confidence_mean" in b \
                    and m["control_confidence_mean"] < b["control_confidence_mean"] - c.confidence_drop:
                out.append(f"control_confidence_mean {m['control_confidence_mean']:.3f} dropped > "
                           f"{c.confidence_drop} below baseline {b['control_confidence_mean']:.3f}")
            if get("entropy_mean") is not None and "entropy_mean" in b and b["entropy_mean"] > 0 \
                    and m["entropy_mean"] > c.entropy_ratio * b["entropy_mean"] + 0.05:
                out.append(f"entropy_mean {m['entropy_mean']:.3f} > {c.entropy_ratio}x baseline "
                           f"{b['entropy_mean']:.3f}")
            if c.reward_drop_ratio is not None and get("reward_mean") is not None \
                    and b.get("reward_mean", 0) > 0 and m["reward_mean"] < c.reward_drop_ratio * b["reward_mean"]:
                out.append(f"reward_mean {m['reward_mean']:.3f} < {c.reward_drop_ratio}x baseline "
                           f"{b['reward_mean']:.3f}")
        return out

    def post_update_signals(self, m: dict) -> list[str]:
        """Signals of the post-update probe (`post_*` metrics): the weights this step produced."""
        c, out = self.config, []
        if m.get("post_logprob_gap_mean") is not None and m["post_logprob_gap_mean"] > c.max_update_shift:
            out.append(f"post-update log-prob shift {m['post_logprob_gap_mean']:.3f} > {c.max_update_shift}")
        if m.get("post_spike_count") is not None and m.get("post_tokens_rl"):
            rate = m["post_spike_count"] / m["post_tokens_rl"]
            if rate > c.max_spike_rate:
                out.append(f"post-update spike rate {rate:.4f} > {c.max_spike_rate}")
        return out

    def update(self, metrics: dict) -> Verdict:
        """Check one step's metrics (plain floats); update the baseline on healthy steps."""
        if self.config.policy == "off":
            return Verdict(False, False)
        rollout_reasons = self.signals(metrics)
        post_reasons = self.post_update_signals(metrics)
        reasons = rollout_reasons + post_reasons
        if reasons:
            self.streak += 1
        else:
            self.streak = 0
            self.healthy_steps += 1
            d = self.config.baseline_decay
            for k in BASELINE_KEYS:
                if metrics.get(k) is not None:
                    self.baseline[k] = metrics[k] if k not in self.baseline else \
                        d * self.baseline[k] + (1 - d) * metrics[k]
        warning = self.streak >= self.config.patience
        self.warnings += int(warning)
        severe = warning and (bool(post_reasons) or
                              (metrics.get("format_error_rate") or 0.0) > self.config.rollback_format_error_rate)
        return Verdict(warning, severe, reasons, rollouts_flagged=bool(rollout_reasons))

    def state_dict(self) -> dict:
        return {"baseline": dict(self.baseline), "healthy_steps": self.healthy_steps,
                "streak": self.streak, "warnings": self.warnings}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = dict(state["baseline"])
        self.healthy_steps, self.streak, self.warnings = state["healthy_steps"], state["streak"], state["warnings"]

    def describe(self) -> dict:
        return asdict(self.config)
