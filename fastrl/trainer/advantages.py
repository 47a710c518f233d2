"""Group-relative advantages (GRPO) from episode rewards."""
from __future__ import annotations

from collections import defaultdict

import numpy as np


def group_advantages(rewards, group_ids, *, std_normalize: bool = True, eps: float = 1e-6) -> np.ndarray:
    """A_i = r_i - mean(group), divided by the group's std when `std_normalize` (GRPO); without it
    (Dr.GRPO) the raw difference. A group whose rewards are all equal gets zero advantages."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {rewards.shape}")
    if len(group_ids) != len(rewards):
        raise ValueError(f"{len(rewards)} rewards but {len(group_ids)} group ids")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if len(bad):
        raise ValueError(f"rewards[{bad[0]}] = {rewards[bad[0]]} is not finite")
    members = defaultdict(list)
    for i, g in enumerate(group_ids):
        members[g].append(i)
    adv = np.zeros_like(rewards)
    for idx in members.values():
        r = rewards[idx]
        centred = r - r.mean()
        if std_normalize:
            centred = centred / (r.std(ddof=0) + eps) if r.std(ddof=0) > 0 else np.zeros_like(r)
        adv[idx] = centred
    return adv.astype(np.float32)
