"""The GRPO recipe end to end on the tiny model: metrics, supervision in the one forward,
interleaved SFT, monitor actions, exact resume after a SIGKILL."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fastrl.config import load_config
from fastrl.trainer.checkpoint import latest_checkpoint
from fastrl.trainer.config import TrainConfig
from fastrl.trainer.grpo import Trainer
from fastrl.trainer.metrics_log import read_events, read_metrics


def tiny_config(run_dir, **over):
    raw = {"run_dir": str(run_dir), "seed": 3, "steps": 2, "checkpoint_every": 1, "progress": False,
           "model": {"tiny_hidden_size": 64},
           "env": {"train_tasks": 16, "eval_tasks": 4, "difficulty": 1},
           "rollout": {"engine": "hf", "tasks_per_step": 2, "group_size": 3, "max_new_tokens": 24, "max_turns": 2,
                       "max_total_tokens": 1500},
           "optim": {"lr": 1e-3, "micro_batch_tokens": 4096},
           "supervision": {"sft_weight": 0.2, "ets_window": 2, "ops_replace": 1, "hbg_hinted": 1,
                           "unlikelihood_weight": 0.1}}
    for key, value in over.items():
        node = raw
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def test_recipe_runs_with_supervision_in_the_single_forward(tmp_path):
    cfg = load_config(TrainConfig, tiny_config(tmp_path / "run"))
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["steps"] == 2
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # Expert SFT rows (OPS + ETS) rode along in the RL micro-batches: one forward each.
        assert r["supervised_trajectories"] > 0 and r["tokens_sft"] > 0
        assert r["forward_passes"] == r["micro_batches"]
        assert r["ref_forward_passes"] == 0
        for key in ("reward_mean", "success_rate", "format_error_rate", "intrusion_mean", "intrusion_max",
                    "control_confidence_mean", "spike_count", "entropy_mean", "grad_norm", "lr", "loss",
                    "time_rollout", "time_forward_backward", "time_optimizer", "time_sync", "logprob_gap_mean"):
            assert key in r, key
    # Rollout and trainer log-probs of the same tokens agree (same weights, fp32): the gap is small.
    assert rows[0]["logprob_gap_mean"] < 1e-3
    assert latest_checkpoint(tmp_path / "run") is not None
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert summary["final_model"] and (tmp_path / "run" / "final_model" / "config.json").is_file()

    # `fastrl eval` on the checkpoint and on the exported model give the same greedy results.
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tmp_path / "run")))
    results = []
    for ckpt in (latest_checkpoint(tmp_path / "run"), tmp_path / "run" / "final_model"):
        out = subprocess.run([sys.executable, "-m", "fastrl", "eval", str(cfg_path), "--checkpoint", str(ckpt)],
                             capture_output=True, text=True, timeout=600, check=True).stdout
        results.append(json.loads(out[out.index("{"):]))
    assert set(results[0]) == {"test", "content_shift", "format_shift"}
    assert results[0] == results[1]
    assert all(r["n"] == 4 for r in results[0].values())


def test_recipe_runs_in_mixed_precision(tmp_path):
    """model.autocast=bfloat16: fp32 master weights stay fp32, the engine samples in bf16, the step
    trains (finite loss and gradient) and the rollout/trainer log-prob gap stays at bf16 scale."""
    cfg = load_config(TrainConfig, tiny_config(tmp_path / "run", steps=1, **{"model.autocast": "bfloat16"}))
    trainer = Trainer(cfg)
    try:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        summary = trainer.run()
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    finally:
        trainer.close()
    assert summary["steps"] == 1 and summary["skipped_steps"] == 0
    row = read_metrics(tmp_path / "run")[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    assert 0 < row["logprob_gap_mean"] < 0.2
    with pytest.raises(ValueError, match="model.autocast = bfloat16 needs model.dtype = float32"):
        load_config(TrainConfig, tiny_config(tmp_path / "x", **{"model.autocast": "bfloat16",
                                                                "model.dtype": "bfloat16"}))


def test_recipe_on_the_vllm_engine_keeps_rollout_and_trainer_logprobs_together(tmp_path):
    # vLLM on the CPU needs head_dim >= 32: hidden 128 with 4 heads.
    cfg = load_config(TrainConfig, tiny_config(tmp_path / "run", steps=1, **{"rollout.engine": "vllm",
                                                                        "model.tiny_hidden_size": 128}))
    trainer = Trainer(cfg)
    try:
        assert type(trainer.engine).__name__ == "VLLMEngine"
        trainer.run()
    finally:
        trainer.close()
    row = read_metrics(tmp_path / "run")[0]
    # fp32 on both sides: vLLM's sampling log-probs are the trainer's within float noise.
    assert row["logprob_gap_mean"] < 1e-3
    assert row["weight_version"] == 1


def test_interleaved_scheme_and_stabilize_actions(tmp_path):
    # A monitor that always fires (format errors of an untrained model) under `stabilize`.
    cfg = load_config(TrainConfig, tiny_config(
        tmp_path / "run", **{"supervision.scheme": "interleaved", "supervision.interleave_every": 1,
                             "supervision.interleave_steps": 1, "supervision.sft_weight": 0.0,
                             "monitor.policy": "stabilize", "monitor.max_format_error_rate": -1.0,
                             "monitor.rollback_format_error_rate": -1.0}))
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    rows = read_metrics(tmp_path / "run")
    events = read_events(tmp_path / "run")
    kinds = [e["kind"] for e in events]
    assert "warning" in kinds and "action" in kinds
    messages = " ".join(e["message"] for e in events)
    assert "SFT weight raised" in messages and "SFT steps on erroneous tasks" in messages
    # Every step warned, so no checkpoint is healthy: the wanted rollback is logged, not done.
    assert "rollback wanted but no healthy checkpoint" in messages
    assert rows[0]["sft_phase_steps"] >= 1    # the interleaved phase ran after step 1
    assert rows[1]["sft_weight"] == cfg.monitor.sft_weight_on_warning


def test_severe_warning_rolls_back_to_the_healthy_checkpoint_with_lower_lr(tmp_path):
    import torch

    cfg = load_config(TrainConfig, tiny_config(tmp_path / "run", **{"monitor.policy": "stabilize"}))
    trainer = Trainer(cfg)
    try:
        metrics = trainer.rl_step()
        trainer.checkpoint()
        trainer.healthy_checkpoint = trainer.candidate_checkpoint   # as a healthy next step confirms it
        saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        lr_before = trainer.optimizer.param_groups[0]["lr"]
        trainer.rl_step()                          # the weights move on
        assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in saved.items())
        severe = dict(metrics, format_error_rate=0.9)
        trainer.act_on(2, severe)
        assert severe["collapse_warning"] == 1.0
        for k, v in trainer.model.state_dict().items():
            assert torch.equal(v, saved[k]), k
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_before * cfg.monitor.rollback_lr_factor)
        assert trainer.supervision.sft_weight == cfg.monitor.sft_weight_on_warning
        # The engine serves the rolled-back weights.
        assert trainer.engine.weight_version == trainer.version
    finally:
        trainer.close()
    messages = [e["message"] for e in read_events(tmp_path / "run")]
    assert any(m.startswith("rolled back to step_00000001") for m in messages)


def test_post_update_probe_rejects_each_update_that_moves_too_far(tmp_path):
    """Only the post-update probe can fire here (rollout signals disabled) and every update moves
    the log-probs by more than the threshold: each step's rollouts confirm the checkpoint they came
    from, the probe condemns the new weights, and stabilize rolls back to that checkpoint. Every
    update is rejected, so the run ends on its starting weights."""
    cfg = load_config(TrainConfig, tiny_config(tmp_path / "run", steps=2, **{
        "monitor.policy": "stabilize", "monitor.post_update_probe": True, "monitor.max_update_shift": 1e-9,
        "monitor.max_format_error_rate": 1.0, "monitor.max_spike_rate": 1.0,
        "monitor.min_control_confidence": -1e9, "monitor.warmup_steps": 100}))
    trainer = Trainer(cfg)
    try:
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.run()
        for k, v in trainer.model.state_dict().items():
            assert torch.equal(v, start[k]), k
    finally:
        trainer.close()
    rows = read_metrics(tmp_path / "run")
    assert [r["collapse_warning"] for r in rows] == [1.0, 1.0]
    for r in rows:
        assert r["probe_forward_passes"] == r["micro_batches"] and r["post_logprob_gap_mean"] > 0
    messages = [e["message"] for e in read_events(tmp_path / "run")]
    assert any(m.startswith("rolled back to step_00000000") for m in messages)
    assert any(m.startswith("rolled back to step_00000001") for m in messages)
    assert all("post-update log-prob shift" in e["message"] for e in read_events(tmp_path / "run")
               if e["kind"] == "warning")


def test_each_warning_cuts_the_lr_down_to_the_floor(tmp_path):
    from fastrl.trainer.monitor import Verdict

    cfg = load_config(TrainConfig, tiny_config(tmp_path / "run", **{
        "monitor.policy": "stabilize", "monitor.warning_lr_factor": 0.5, "monitor.min_lr_scale": 0.2,
        "optim.warmup_steps": 0}))
    trainer = Trainer(cfg)
    trainer.monitor.update = lambda m: Verdict(warning=True, severe=False, reasons=["forced"])
    try:
        metrics = trainer.rl_step()
        lr0 = trainer.optimizer.param_groups[0]["lr"]
        expected = []
        for _ in range(4):                      # x0.5, x0.25, then the floor 0.2 twice
            trainer.act_on(1, dict(metrics))
            expected.append(trainer.optimizer.param_groups[0]["lr"] / lr0)
        assert expected == pytest.approx([0.5, 0.25, 0.2, 0.2])
        assert trainer.supervision.lr_scale == pytest.approx(0.2)
        trainer.rl_step()                       # the scheduler keeps the cut on the next step
        assert trainer.scheduler.base_lrs[0] == pytest.approx(cfg.optim.lr * 0.2)
    finally:
        trainer.close()
    assert sum(e["message"].startswith("LR cut to x") for e in read_events(tmp_path / "run")) == 4


@pytest.mark.parametrize("key,value", [("warning_lr_factor", 0.0), ("warning_lr_factor", 1.5),
                                       ("rollback_lr_factor", -0.5), ("min_lr_scale", 0.0)])
def test_lr_factors_out_of_range_are_rejected(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"monitor.{key}"):
        load_config(TrainConfig, tiny_config(tmp_path / "run", **{f"monitor.{key}": value}))


def test_a_checkpoint_is_healthy_only_once_the_next_steps_rollouts_are(tmp_path):
    # The checkpoint after step s holds the weights that step s + 1 rolls out with: step 3's
    # warning condemns the step-2 checkpoint, so the rollback target stays step 1's.
    from fastrl.trainer.monitor import Verdict

    cfg = load_config(TrainConfig, tiny_config(tmp_path / "run", steps=3, keep_last=5))
    trainer = Trainer(cfg)
    calls = []

    def verdict(metrics):
        calls.append(1)
        return Verdict(warning=len(calls) == 3, severe=False, reasons=["forced"] if len(calls) == 3 else [])

    trainer.monitor.update = verdict
    try:
        trainer.run()
        assert trainer.healthy_checkpoint.endswith("step_00000001")
        assert trainer.candidate_checkpoint.endswith("step_00000003")   # not judged yet
    finally:
        trainer.close()


def _train_cmd(config_path, *extra):
    return [sys.executable, "-m", "fastrl", "train", str(config_path), *extra]


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith("time") and k != "seconds"}


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    steps = 3
    full_cfg = tiny_config(tmp_path / "full", steps=steps, **{"supervision.ops_replace": 0})
    cut_cfg = tiny_config(tmp_path / "cut", steps=steps, **{"supervision.ops_replace": 0})
    for name, raw in (("full", full_cfg), ("cut", cut_cfg)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(tmp_path / "full.yaml"), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)

    proc = subprocess.Popen(_train_cmd(tmp_path / "cut.yaml"), env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 600
    target = tmp_path / "cut" / "checkpoints" / "step_00000002"
    while not (target / "COMPLETE").is_file():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    subprocess.run(_train_cmd(tmp_path / "cut.yaml", "--resume"), check=True, env=env, timeout=600,
                   stdout=subprocess.DEVNULL)

    full = read_metrics(tmp_path / "full")
    cut = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in full] == [1, 2, 3]
    for a, b in zip(full, cut):
        assert _comparable(a) == _comparable(b), a["step"]
