"""Evaluation: greedy rollouts on held-out tasks of every configured split."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastrl.rollout import generate_episodes
from fastrl.trainer.config import TrainConfig
from fastrl.trainer.grpo import load_policy, make_env, make_rollout_engine, prepare_model_path, sampling_for

EVAL_SEED_OFFSET = 10_007   # eval tasks come from their own seed, never the training stream


def evaluate(engine, env, tasks, cfg: TrainConfig) -> dict:
    """Greedy single rollouts: success (correct answer), format-error rate, mean reward."""
    if not tasks:
        raise ValueError("evaluate: no tasks")
    trajs = generate_episodes(engine, env, tasks, sampling_for(cfg, 0, n=1, greedy=True))
    return {"success": float(np.mean([t.reward_info.get("correct", 0.0) for t in trajs])),
            "format_error_rate": float(np.mean([t.format_error for t in trajs])),
            "reward": float(np.mean([t.reward for t in trajs])), "n": len(trajs)}


def evaluate_splits(engine, env, make_tasks, cfg: TrainConfig) -> dict:
    """{split: evaluate(...)} over cfg.env.eval_splits, cfg.env.eval_tasks tasks each."""
    return {split: evaluate(engine, env, make_tasks(split, cfg.env.eval_tasks, cfg.seed + EVAL_SEED_OFFSET), cfg)
            for split in cfg.env.eval_splits}


def evaluate_checkpoint(cfg: TrainConfig, checkpoint: str) -> dict:
    """Evaluate a training checkpoint (run_dir/checkpoints/step_*) or an exported model dir."""
    path = Path(checkpoint)
    if (path / "config.json").is_file():            # an exported Hugging Face model
        model_path = str(path)
        engine = make_rollout_engine(cfg, model_path)
    elif (path / "model.safetensors").is_file():    # a training checkpoint over the base model
        from fastrl.trainer.checkpoint import load_checkpoint

        model_path = prepare_model_path(cfg)
        model, _ = load_policy(model_path, cfg)
        load_checkpoint(path, model=model, restore_rng=False)
        engine = make_rollout_engine(cfg, model_path)
        engine.update_weights(model.state_dict(), 1)
    else:
        raise ValueError(f"--checkpoint {checkpoint}: neither a model dir (config.json) nor a checkpoint "
                         "(model.safetensors)")
    env, make_tasks = make_env(cfg)
    try:
        return evaluate_splits(engine, env, make_tasks, cfg)
    finally:
        engine.close()
