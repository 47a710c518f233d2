"""Which policy sampled a trajectory: training on samples of older weights is an error unless an
explicit off-policy lag allows it."""
from __future__ import annotations


class StaleTrajectoryError(ValueError):
    """A trajectory was sampled by weights other than the trainer's current ones."""


def check_versions(trajectories, current_version: int, max_lag: int = 0) -> None:
    """Raise naming the first trajectory whose weight_version is missing, from the future, or more
    than `max_lag` versions behind `current_version`. Expert trajectories carry no version."""
    if max_lag < 0:
        raise ValueError(f"max_lag must be >= 0, got {max_lag}")
    for i, t in enumerate(trajectories):
        if t.is_expert:
            continue
        name = f"trajectory {i} (task {t.task_id!r}, group {t.group_id!r})"
        v = t.weight_version
        if v is None:
            raise StaleTrajectoryError(f"{name} has no weight_version: cannot tell which policy "
                                       "sampled it")
        if v > current_version:
            raise StaleTrajectoryError(f"{name} was sampled by weight version {v}, newer than "
                                       f"the trainer's {current_version}")
        if current_version - v > max_lag:
            raise StaleTrajectoryError(
                f"{name} was sampled by weight version {v} but the trainer is at "
                f"{current_version} (lag {current_version - v} > max_lag {max_lag}); "
                "sync weights before sampling or allow an off-policy lag")
