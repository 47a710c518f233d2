"""Rollouts: engines (vLLM in-process, transformers generate) with in-process weight sync, the
multi-turn episode driver, expert trajectories, and the on-policy version check."""
from fastrl.rollout.engine import (Completion, Engine, GenerationRequest, make_engine,
                                   vllm_available)
from fastrl.rollout.episodes import RolloutTrajectory, generate_episodes
from fastrl.rollout.expert import expert_trajectory
from fastrl.rollout.sampling import SamplingConfig
from fastrl.rollout.versions import StaleTrajectoryError, check_versions

__all__ = ["Completion", "Engine", "GenerationRequest", "RolloutTrajectory", "SamplingConfig",
           "StaleTrajectoryError", "check_versions", "expert_trajectory", "generate_episodes",
           "make_engine", "vllm_available"]
