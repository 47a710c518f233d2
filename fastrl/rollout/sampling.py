"""Sampling settings of a rollout: group size, decoding, per-turn and per-episode limits, hints."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingConfig:
    n: int = 1                    # rollouts per task (group size G), group_id = task index
    temperature: float = 1.0      # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256     # per assistant turn
    max_turns: int = 8            # assistant turns per episode
    max_total_tokens: int = 4096  # prompt + turns + observations of an episode
    seed: int | None = None       # None: unseeded sampling
    num_hinted: int = 0           # h of the n rollouts of a group see the task's hint
    # Stop a turn at the tool-call close tag instead of the end-of-turn token. The end-of-turn
    # token is then not sampled: it goes into the following (untrained) observation glue. Off by
    # default: it limits a turn to one call and leaves the end-of-turn token after calls untrained.
    stop_at_tool_close: bool = False
    env_workers: int = 8          # threads running env.step (tool calls) of different episodes

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if not 0 <= self.num_hinted <= self.n:
            raise ValueError(f"sampling.num_hinted must be in [0, n={self.n}], "
                             f"got {self.num_hinted}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "max_turns", "max_total_tokens", "env_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"sampling.{name} must be >= 1, got {getattr(self, name)}")
