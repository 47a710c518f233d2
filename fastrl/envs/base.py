"""The environment interface a rollout loop drives, and the reward arithmetic shared by all envs.

    state = env.reset(task, hint=False)        # state.messages: system + first user message
                                               # state.tools: specs for apply_chat_template
                                               #   (None when the tools are described in the
                                               #   system prompt, as in the format-shift split)
    while not state.done:
        text = policy(state.messages, state.tools)  # one decoded assistant turn
        obs, done, info = env.step(state, text)     # obs: new messages (tool results, error
                                                    #   observations, next user turn) or None
    r = env.reward(state)   # {"format", "correct", "total", "per_turn"}

`step` never raises on model output: every malformed call becomes an error observation plus a
format-error entry in `info["format_errors"]`. The assistant text is stored verbatim (minus a
trailing end-of-turn token) so re-rendering the conversation reproduces what the model wrote.

Rewards (weights configurable, `RewardWeights`):

    format  = mean over assistant turns of 1[turn well-formed]
    correct = 1[final answer / BFCL state+response checks pass]
    total   = w_format * format + w_correct * correct
    per_turn[i] = w_format * 1[turn i well-formed] / n_turns + (w_correct * correct if i is last)

so per-turn rewards sum to the episode total (useful for per-turn credit assignment).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass
class RewardWeights:
    format: float = 0.2
    correct: float = 1.0


@dataclass
class TurnInfo:
    """What happened in one assistant turn."""
    index: int
    format_ok: bool
    format_errors: list[str] = field(default_factory=list)
    num_calls: int = 0
    tool_errors: list[str] = field(default_factory=list)  # exceptions and timeouts (not format)
    answer: str | None = None

    def as_dict(self) -> dict:
        return {"turn": self.index, "format_ok": self.format_ok,
                "format_errors": list(self.format_errors), "num_calls": self.num_calls,
                "tool_errors": list(self.tool_errors), "answer": self.answer}


@dataclass
class EpisodeState:
    """One episode. `messages` grows as the episode runs; `extra` holds env-specific state."""
    task: Any
    messages: list[dict]
    tools: list[dict] | None
    hint: str | None = None
    turns: list[TurnInfo] = field(default_factory=list)
    done: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict]:
        """The initial messages (system + first user turn)."""
        return self.messages[: self.extra.get("num_prompt_messages", len(self.messages))]


class StepResult(NamedTuple):
    observation: list[dict] | None
    done: bool
    info: dict


def combine_rewards(turns: list[TurnInfo], correct: float, weights: RewardWeights) -> dict:
    n = len(turns)
    fmt = sum(t.format_ok for t in turns) / n if n else 0.0
    per_turn = [weights.format * float(t.format_ok) / n for t in turns]
    if per_turn:
        per_turn[-1] += weights.correct * correct
    return {"format": fmt, "correct": float(correct),
            "total": weights.format * fmt + weights.correct * correct, "per_turn": per_turn}


def format_error_message(errors: list[str]) -> dict:
    """An observation telling the model what was malformed in its turn."""
    return {"role": "tool", "name": "format_error",
            "content": "Format error: " + "; ".join(errors)}
