"""Multi-turn episodes in token space.

A trajectory is a list of segments (prompt, assistant generation, tool observation), each
holding token ids. The trained sequence is their exact concatenation: assistant ids are the ids
the rollout engine sampled, prompt and observation ids come from the chat template
(fastrl.data.chat_template). Per token it yields the id, the TokenKind, the rollout log-prob and
the advantage; prompts and observations are IGNORE, assistant tokens (the end-of-turn token that
closes each turn included) are RL for policy samples and SFT for expert trajectories.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from fastrl.data._impl import as_int_array
from fastrl.ops.token_kind import TokenKind


class Role(str, Enum):
    PROMPT = "prompt"            # system/user messages and the generation prompt
    ASSISTANT = "assistant"      # sampled (or expert) tokens, end-of-turn token included
    OBSERVATION = "observation"  # tool results and template glue up to the next generation prompt


@dataclass
class Segment:
    role: Role
    token_ids: np.ndarray                 # int64
    logprobs: np.ndarray | None = None    # float32, the rollout engine's log-probs (assistant)
    kinds: np.ndarray | None = None       # int8 per-token override, e.g. UNLIKELIHOOD spans

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class Trajectory:
    """One episode plus what the trainer needs to know about it.

    `hinted_prompt_ids` (hint-based guidance): the prompt the rollout engine actually saw, with
    the hint; the trajectory itself trains on the hint-free prompt in its first segment.
    `advantage` is spread over the trained tokens unless `token_advantages` gives one per token.
    """
    segments: list[Segment] = field(default_factory=list)
    task_id: str | None = None
    group_id: int | str | None = None
    reward: float = 0.0
    advantage: float = 0.0
    token_advantages: np.ndarray | None = None
    format_error: bool = False
    weight_version: int | None = None     # policy weights that sampled it (None for experts)
    is_expert: bool = False               # gold trajectory: assistant tokens are SFT
    hinted_prompt_ids: np.ndarray | None = None

    # --- building ------------------------------------------------------------------------

    def add_prompt(self, token_ids) -> Trajectory:
        self.segments.append(Segment(Role.PROMPT, _ids(token_ids, "prompt token_ids")))
        return self

    def add_observation(self, token_ids) -> Trajectory:
        self.segments.append(Segment(Role.OBSERVATION, _ids(token_ids, "observation token_ids")))
        return self

    def add_assistant(self, token_ids, logprobs=None, kinds=None) -> Trajectory:
        """A generated turn, exactly as sampled (ending with the end-of-turn token unless it was
        truncated). Policy samples need the rollout log-probs; `kinds` overrides per token."""
        ids = _ids(token_ids, "assistant token_ids")
        if len(ids) == 0:
            raise ValueError(f"segment {len(self.segments)}: empty assistant turn")
        if logprobs is not None:
            logprobs = np.asarray(logprobs, dtype=np.float32).reshape(-1)
            if len(logprobs) != len(ids):
                raise ValueError(f"segment {len(self.segments)}: {len(ids)} tokens but "
                                 f"{len(logprobs)} logprobs")
        elif not self.is_expert:
            raise ValueError(f"segment {len(self.segments)}: a policy sample needs the rollout "
                             "log-probs of its tokens (set is_expert=True for gold turns)")
        if kinds is not None:
            kinds = np.asarray(kinds, dtype=np.int8).reshape(-1)
            if len(kinds) != len(ids):
                raise ValueError(f"segment {len(self.segments)}: {len(ids)} tokens but "
                                 f"{len(kinds)} kinds")
            bad = np.flatnonzero((kinds < 0) | (kinds > max(TokenKind)))
            if len(bad):
                raise ValueError(f"segment {len(self.segments)} kinds[{bad[0]}] = "
                                 f"{kinds[bad[0]]}: not a TokenKind")
        self.segments.append(Segment(Role.ASSISTANT, ids, logprobs, kinds))
        return self

    # --- per-token views -----------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def token_ids(self) -> np.ndarray:
        return _cat([s.token_ids for s in self.segments], np.int64)

    @property
    def prompt_ids(self) -> np.ndarray:
        """The (hint-free) prompt: the segments before the first assistant turn."""
        ids = []
        for s in self.segments:
            if s.role is Role.ASSISTANT:
                break
            ids.append(s.token_ids)
        return _cat(ids, np.int64)

    @property
    def kinds(self) -> np.ndarray:
        trained = TokenKind.SFT if self.is_expert else TokenKind.RL
        parts = []
        for s in self.segments:
            if s.role is not Role.ASSISTANT:
                parts.append(np.full(len(s), TokenKind.IGNORE, np.int8))
            elif s.kinds is not None:
                parts.append(s.kinds)
            else:
                parts.append(np.full(len(s), trained, np.int8))
        return _cat(parts, np.int8)

    @property
    def logprobs(self) -> np.ndarray:
        """Rollout log-probs of sampled tokens, 0 where there is none (check kinds, not zeros)."""
        return _cat([s.logprobs if s.logprobs is not None else np.zeros(len(s), np.float32)
                     for s in self.segments], np.float32)

    @property
    def advantages(self) -> np.ndarray:
        if self.token_advantages is not None:
            adv = np.asarray(self.token_advantages, dtype=np.float32).reshape(-1)
            if len(adv) != len(self):
                raise ValueError(f"token_advantages has {len(adv)} values for {len(self)} tokens")
            return adv
        return np.where(self.kinds != TokenKind.IGNORE, np.float32(self.advantage),
                        np.float32(0.0)).astype(np.float32)

    def assistant_spans(self) -> list[tuple[int, int]]:
        """Half-open token ranges of the assistant turns."""
        spans, start = [], 0
        for s in self.segments:
            if s.role is Role.ASSISTANT:
                spans.append((start, start + len(s)))
            start += len(s)
        return spans


def _ids(token_ids, what: str) -> np.ndarray:
    ids = as_int_array(token_ids, what)
    negative = np.flatnonzero(ids < 0)
    if len(negative):
        raise ValueError(f"{what}[{negative[0]}] = {ids[negative[0]]}: token ids are non-negative")
    return ids


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


@dataclass
class SequenceStore:
    """All trajectories of a step as flat arrays (offsets[i]:offsets[i+1] is trajectory i), the
    input of `build_packed_batch`. Packing plans index into it; nothing is copied per plan."""
    token_ids: np.ndarray    # int64
    kinds: np.ndarray        # int8, kind of each token itself (not yet shifted)
    logprobs: np.ndarray     # float32
    advantages: np.ndarray   # float32
    offsets: np.ndarray      # int64, num_sequences + 1

    @classmethod
    def from_trajectories(cls, trajectories: list[Trajectory]) -> SequenceStore:
        for i, t in enumerate(trajectories):
            if len(t) == 0:
                raise ValueError(f"trajectories[{i}] has no tokens")
        lengths = np.array([len(t) for t in trajectories], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(token_ids=_cat([t.token_ids for t in trajectories], np.int64),
                   kinds=_cat([t.kinds for t in trajectories], np.int8),
                   logprobs=_cat([t.logprobs for t in trajectories], np.float32),
                   advantages=_cat([t.advantages for t in trajectories], np.float32),
                   offsets=offsets)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1
