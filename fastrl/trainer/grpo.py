"""The GRPO recipe with supervisory signals, read top to bottom.

    setup: model + tokenizer, environment + tasks, rollout engine, optimizer + schedule,
           collapse monitor, metrics log; resume from the latest checkpoint if asked
    SFT warm-up (optional): expert trajectories of training tasks
    per RL step:
        rollout (G per task; h hinted; k replaced by the expert)       fastrl.rollout
        rewards -> group advantages                                    fastrl.trainer.advantages
        supervision: expert SFT (OPS), erroneous tasks' SFT (ETS), unlikelihood on malformed turns
        one packed forward per micro-batch -> fused loss -> step       fastrl.trainer.update
        weight sync to the engine
        interleaved scheme: every k steps, m SFT steps on the same model and optimizer
        monitor: collapse warning -> (stabilize) raise SFT, SFT phase, roll back with lower LR
        metrics line, checkpoint
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from fastrl.config import save_config
from fastrl.data.trajectory import Role
from fastrl.ops import TokenKind
from fastrl.rollout import SamplingConfig, check_versions, expert_trajectory, generate_episodes, make_engine
from fastrl.trainer.advantages import group_advantages
from fastrl.trainer.checkpoint import (export_pretrained, gather_train_state, latest_checkpoint, load_checkpoint,
                                      save_checkpoint)
from fastrl.trainer.config import TrainConfig
from fastrl.trainer.distributed import (broadcast_object, cleanup, full_state_dict, init_distributed,
                                        is_sharded, shard_trajectories, wrap_model)
from fastrl.trainer.metrics_log import MetricsLogger
from fastrl.trainer.monitor import CollapseMonitor
from fastrl.trainer.update import policy_update


# ----------------------------------------------------------------------------------- setup
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_model_path(cfg: TrainConfig) -> str:
    """The user's model dir, or the tiny model built (once) inside the run dir."""
    if cfg.model.path:
        return cfg.model.path
    from fastrl.models import build_tiny_model

    path = Path(cfg.run_dir) / "base_model"
    if not (path / "config.json").is_file():
        build_tiny_model(path, hidden_size=cfg.model.tiny_hidden_size, num_layers=cfg.model.tiny_layers,
                         num_heads=cfg.model.tiny_heads, seed=cfg.model.tiny_seed)
        return str(path)
    # A rerun into the same run dir reuses the model built there; a changed size must not be
    # silently replaced by the old one.
    built = json.loads((path / "config.json").read_text())
    for key, field in (("hidden_size", "tiny_hidden_size"), ("num_hidden_layers", "tiny_layers"),
                       ("num_attention_heads", "tiny_heads")):
        if built.get(key) != getattr(cfg.model, field):
            raise ValueError(f"{path} holds a tiny model with {key}={built.get(key)}, but "
                             f"model.{field} = {getattr(cfg.model, field)}; use a new run_dir "
                             "or remove that one")
    return str(path)


def load_policy(model_path: str, cfg: TrainConfig, device=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, cfg.model.dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.model.liger_kernels and device == "cuda":
        try:
            import liger_kernel.transformers as liger
        except ImportError as e:
            raise RuntimeError("model.liger_kernels=true needs liger-kernel installed (pip install "
                               "'fastrl[gpu]')") from e
        apply = getattr(liger, f"apply_liger_kernel_to_{_model_type(model_path)}", None)
        if apply is None:
            raise RuntimeError(f"liger-kernel has no kernels for model type {_model_type(model_path)!r}")
        # Layer kernels only: the LM head and loss are fastrl's own fused ops.
        apply(rms_norm=True, rope=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype,
                                                 attn_implementation=cfg.model.attn_implementation).to(device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return model, tokenizer


def _model_type(model_path: str) -> str:
    import json

    return json.loads((Path(model_path) / "config.json").read_text())["model_type"]


def make_env(cfg: TrainConfig):
    """(env, tasks(split, n, seed)) for the configured environment."""
    from fastrl.envs import RewardWeights

    weights = RewardWeights(format=cfg.env.format_weight, correct=cfg.env.correct_weight)
    if cfg.env.name == "synthetic":
        from fastrl.envs import SyntheticConfig, SyntheticEnv, make_tasks

        env = SyntheticEnv(SyntheticConfig(weights=weights))   # rollout.max_turns caps sampled episodes
        return env, lambda split, n, seed: make_tasks(split, n, seed=seed, difficulty=cfg.env.difficulty)
    from fastrl.envs import bfcl

    env = bfcl.BfclEnv(bfcl.BfclConfig(weights=weights))

    def tasks(split, n, seed):
        cats = cfg.env.bfcl_categories if split == "train" else [split]
        items = bfcl.load_tasks(tuple(cats))
        random.Random(seed).shuffle(items)
        return items[:n]

    return env, tasks


def make_rollout_engine(cfg: TrainConfig, model_path: str):
    """The configured engine, sampling in the trainer's dtype (so rollout and trainer log-probs
    of the same tokens agree)."""
    from fastrl.rollout import vllm_available

    kind = cfg.rollout.engine
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    opts = {"dtype": cfg.model.autocast or cfg.model.dtype}
    if kind == "vllm":
        opts["max_model_len"] = cfg.rollout.max_total_tokens
        if torch.cuda.is_available():
            opts.update(gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                        tensor_parallel_size=cfg.rollout.tensor_parallel_size)
    return make_engine(kind, model_path, **opts)


def control_ids_of(tokenizer) -> list[int]:
    from fastrl.models import control_token_ids

    return sorted(set(control_token_ids(tokenizer).values()))


def lr_factor(step: int, warm: int, cosine: bool, decay_steps: int) -> float:
    """Linear warm-up over `warm` steps, then constant or a cosine from 1 down to 0.1 reached
    `decay_steps` steps after the warm-up (and held)."""
    if step < warm:
        return (step + 1) / warm
    if cosine:
        progress = (step - warm) / max(decay_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def make_scheduler(optimizer, cfg: TrainConfig):
    warm, total = cfg.optim.warmup_steps, max(cfg.steps, 1)
    cosine = cfg.optim.schedule == "cosine"
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warm, cosine, total - warm))


def sft_warmup_lr(cfg: TrainConfig, done: int) -> float:
    """Learning rate of SFT warm-up step `done` (0-based): constant, or a 5% linear warm-up then a
    cosine decay to 10% of sft_warmup_lr at the last step."""
    if cfg.sft_warmup_schedule == "constant":
        return cfg.sft_warmup_lr
    total = cfg.sft_warmup_steps
    warm = max(1, round(0.05 * total))
    return cfg.sft_warmup_lr * lr_factor(done, warm, True, total - warm - 1)


def sampling_for(cfg: TrainConfig, step: int, *, n=None, hinted=0, greedy=False) -> SamplingConfig:
    r = cfg.rollout
    return SamplingConfig(n=r.group_size if n is None else n, temperature=0.0 if greedy else r.temperature,
                          top_p=1.0 if greedy else r.top_p, max_new_tokens=r.max_new_tokens,
                          max_turns=r.max_turns, max_total_tokens=r.max_total_tokens,
                          seed=cfg.seed * 1_000_003 + step, num_hinted=hinted)


# ------------------------------------------------------------------------- supervision
def mark_malformed_control_tokens(traj, control_ids) -> int:
    """ETS unlikelihood: in assistant turns the env judged malformed, control tokens other than
    the end-of-turn token become UNLIKELIHOOD tokens. Returns how many were marked."""
    turn_ok = [info.get("format_ok", True) for info in getattr(traj, "turn_infos", [])]
    eot = traj.segments[-1].token_ids[-1] if traj.segments else None
    marked, turn = 0, 0
    control = np.asarray(control_ids)
    for seg in traj.segments:
        if seg.role is not Role.ASSISTANT:
            continue
        if turn < len(turn_ok) and not turn_ok[turn]:
            kinds = np.full(len(seg), int(TokenKind.RL), np.int8) if seg.kinds is None else seg.kinds.copy()
            hits = np.isin(seg.token_ids, control) & (seg.token_ids != eot)
            hits[-1] = False                      # the turn's own closing token stays RL
            kinds[hits] = TokenKind.UNLIKELIHOOD
            seg.kinds = kinds
            marked += int(hits.sum())
        turn += 1
    return marked


class SupervisionState:
    """Which tasks failed recently (ETS) and the live supervision settings the monitor can raise."""

    def __init__(self, cfg: TrainConfig):
        self.failed_at: dict[str, int] = {}       # task id -> last step it failed
        # Synchronous SFT weight; other schemes start at 0 (the monitor may raise it).
        self.sft_weight = cfg.supervision.sft_weight if cfg.supervision.scheme == "sync" else 0.0
        self.pending_sft_steps = 0                # SFT steps scheduled by the monitor
        self.rollbacks = 0
        self.lr_scale = 1.0

    def record(self, step: int, trajectories) -> None:
        for t in trajectories:
            if t.reward_info.get("correct", 0.0) < 1.0 or t.format_error:
                self.failed_at[t.task_id] = step

    def erroneous(self, step: int, window: int) -> list[str]:
        recent = [(s, tid) for tid, s in self.failed_at.items() if step - s < window]
        return [tid for _, tid in sorted(recent, reverse=True)]

    def state_dict(self) -> dict:
        return {"failed_at": dict(self.failed_at), "sft_weight": self.sft_weight,
                "pending_sft_steps": self.pending_sft_steps, "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale}

    def load_state_dict(self, s: dict) -> None:
        self.failed_at = {k: int(v) for k, v in s["failed_at"].items()}
        self.sft_weight, self.pending_sft_steps = s["sft_weight"], s["pending_sft_steps"]
        self.rollbacks, self.lr_scale = s["rollbacks"], s["lr_scale"]


# ---------------------------------------------------------------------------------- train
SFT_TASK_STREAM = 10_000_000


class _QuietLog:
    """The metrics log of ranks other than 0: they compute, rank 0 writes."""

    def log(self, step, metrics):
        return metrics

    def event(self, step, kind, message, **fields):
        return None

    def close(self):
        return None


class Trainer:
    """Holds the run's objects; `run()` is the loop. Built by `Trainer(cfg)`; the pieces are plain
    attributes so a notebook can poke at them.

    Under torchrun every rank builds a Trainer: rank 0 owns the rollout engine, the log and the
    checkpoints and shares each step's trajectories; every rank trains on its balanced share and
    gradients are summed over ranks (fastrl.trainer.distributed)."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg = cfg
        self.dist = init_distributed()
        self.main = self.dist.is_main
        self.run_dir = Path(cfg.run_dir)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self.model_path = prepare_model_path(cfg)
        self.model_path = broadcast_object(self.model_path if self.main else None)
        seed_everything(cfg.seed)
        self.model, self.tokenizer = load_policy(self.model_path, cfg, device=self.dist.device)
        self.model = wrap_model(self.model, self.dist)     # before the optimizer (FSDP2 on CUDA)
        self.control_ids = control_ids_of(self.tokenizer)
        self.autocast = getattr(torch, cfg.model.autocast) if cfg.model.autocast else None
        self.env, self.make_tasks = make_env(cfg)
        self.train_tasks = self.make_tasks("train", cfg.env.train_tasks, cfg.seed)
        self.by_id = {str(t.id): t for t in self.train_tasks}
        self._expert_cache: dict[str, object] = {}
        self.ref_model = None
        if cfg.loss.kl_coef:
            self.ref_model, _ = load_policy(self.model_path, cfg, device=self.dist.device)
            self.ref_model.requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                           betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.monitor = CollapseMonitor(cfg.monitor)
        self.supervision = SupervisionState(cfg)
        self.step = 0                 # RL steps done
        self.sft_done = 0             # warm-up SFT steps done
        self.skipped_steps = 0
        # A checkpoint written after step s holds weights whose rollouts are first seen at step
        # s + 1: it is a candidate until that step's verdict is healthy, then the rollback target.
        self.healthy_checkpoint: str | None = None
        self.candidate_checkpoint: str | None = None
        self.version = 0              # weight version of the engine; bumped at every sync
        self.resumed_from = None
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is not None:
                extra = load_checkpoint(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
                self._load_extra(extra)
                self.resumed_from = self.step
        self.engine = make_rollout_engine(cfg, self.model_path) if self.main else None
        weights = full_state_dict(self.model)
        if self.main:
            self.engine.update_weights(weights, self.version)
        self.log = MetricsLogger(self.run_dir, tensorboard=cfg.tensorboard, progress=cfg.progress,
                                 total_steps=cfg.steps, resume_from_step=self.resumed_from) \
            if self.main else _QuietLog()

    # -- checkpoint state
    def _extra(self) -> dict:
        return {"step": self.step, "sft_done": self.sft_done, "skipped_steps": self.skipped_steps,
                "version": self.version,
                "monitor": self.monitor.state_dict(), "supervision": self.supervision.state_dict(),
                "healthy_checkpoint": self.healthy_checkpoint,
                "candidate_checkpoint": self.candidate_checkpoint}

    def _load_extra(self, e: dict) -> None:
        self.step, self.sft_done, self.skipped_steps = e["step"], e["sft_done"], e["skipped_steps"]
        self.version = e["version"]
        self.monitor.load_state_dict(e["monitor"])
        self.supervision.load_state_dict(e["supervision"])
        self.healthy_checkpoint = e["healthy_checkpoint"]
        self.candidate_checkpoint = e.get("candidate_checkpoint")

    def _sync(self) -> float:
        t = time.perf_counter()
        self.version += 1
        weights = full_state_dict(self.model)          # a collective when sharded: every rank
        if self.main:
            self.engine.update_weights(weights, self.version)
        return time.perf_counter() - t

    def _update(self, trajectories, on_policy=None, **kw):
        """policy_update on this rank's balanced share of `trajectories` (all of them alone)."""
        flags = list(on_policy) if on_policy is not None else [False] * len(trajectories)
        if self.dist.world_size > 1:
            trajectories, idx = shard_trajectories(trajectories, self.dist.rank, self.dist.world_size)
            flags = [flags[i] for i in idx]
        return policy_update(self.model, trajectories, optimizer=self.optimizer, control_ids=self.control_ids,
                             micro_batch_tokens=self.cfg.optim.micro_batch_tokens, grad_clip=self.cfg.optim.grad_clip,
                             on_policy=flags, autocast=self.autocast, **kw)

    def _tasks_for_step(self, step: int, per: int | None = None) -> list:
        """A seeded permutation per epoch, so the task stream is a function of the step (resumable).
        `per` tasks per step (default rollout.tasks_per_step)."""
        n, per = len(self.train_tasks), per or self.cfg.rollout.tasks_per_step
        out = []
        for i in range(step * per, (step + 1) * per):
            epoch, pos = divmod(i, n)
            perm = np.random.default_rng(self.cfg.seed * 7919 + epoch).permutation(n)
            out.append(self.train_tasks[perm[pos]])
        return out

    def _experts(self, tasks) -> list:
        """Gold trajectories (SFT rows), rendered once per task: they never change."""
        for t in tasks:
            if str(t.id) not in self._expert_cache:
                self._expert_cache[str(t.id)] = expert_trajectory(self.env, t, self.tokenizer, score=False)
        return [self._expert_cache[str(t.id)] for t in tasks]

    def _sft_step(self, tasks, lr: float) -> object:
        # Expert trajectories are a pure function of the tasks: every rank renders the same ones.
        return self._update(self._experts(tasks), loss_config=dataclasses.replace(self.cfg.loss, sft_weight=1.0),
                            lr=lr)

    # -- phases
    def sft_warmup(self) -> None:
        cfg = self.cfg
        if self.sft_done >= cfg.sft_warmup_steps:
            return
        while self.sft_done < cfg.sft_warmup_steps:
            # Its own stretch of the seeded task stream, far from the RL steps'.
            tasks = self._tasks_for_step(SFT_TASK_STREAM + self.sft_done, cfg.sft_warmup_tasks)
            lr = sft_warmup_lr(cfg, self.sft_done)
            r = self._sft_step(tasks, lr)
            self.sft_done += 1
            # The fields print after the message: "... step 25/700 (loss=0.6873 lr=0.003)".
            self.log.event(0, "sft_warmup", f"SFT warm-up step {self.sft_done}/{cfg.sft_warmup_steps}",
                           loss=r.loss, lr=lr, echo=self.sft_done % 25 == 0 or self.sft_done == cfg.sft_warmup_steps)
        self._sync()

    def rl_step(self) -> dict:
        cfg, sup = self.cfg, self.cfg.supervision
        step = self.step
        timings = {}
        tasks = self._tasks_for_step(step)

        t0 = time.perf_counter()
        if self.main:
            trajs = generate_episodes(self.engine, self.env, tasks,
                                      sampling_for(cfg, step, hinted=sup.hbg_hinted))
            check_versions(trajs, self.version)
        trajs = broadcast_object(trajs if self.main else None)     # rank 0 rolls out for everyone
        timings["time_rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        on_policy = [t.sampled_with_hint and not sup.hbg_importance for t in trajs]
        rollout_stats = {
            "reward_mean": float(np.mean([t.reward for t in trajs])),
            "success_rate": float(np.mean([t.reward_info.get("correct", 0.0) for t in trajs])),
            "format_error_rate": float(np.mean([t.format_error for t in trajs])),
            "truncated_rate": float(np.mean([t.truncated for t in trajs])),
            "response_tokens_mean": float(np.mean([sum(len(s) for s in t.segments if s.role is Role.ASSISTANT)
                                                   for t in trajs])),
        }
        self.supervision.record(step, trajs)
        if sup.ops_replace:    # OPS: the last k rollouts of each group become the expert trajectory
            G = cfg.rollout.group_size
            for gi, task in enumerate(tasks):
                for k in range(G - sup.ops_replace, G):
                    e = expert_trajectory(self.env, task, self.tokenizer, score=True)
                    e.is_expert, e.group_id = False, gi   # trained as RL rows with ratio 1
                    trajs[gi * G + k], on_policy[gi * G + k] = e, True
        rewards = [t.reward for t in trajs]
        adv = group_advantages(rewards, [t.group_id for t in trajs], std_normalize=cfg.optim.std_normalize)
        for t, a in zip(trajs, adv):
            t.advantage = float(a)
        marked = 0
        if sup.unlikelihood_weight:
            for t in trajs:
                if t.format_error and hasattr(t, "turn_infos"):
                    marked += mark_malformed_control_tokens(t, self.control_ids)
        supervised = []
        # The synchronous term: the configured weight (scheme sync), or what the monitor raised it to.
        if self.supervision.sft_weight > 0:
            if sup.ops_expert_sft:
                supervised += self._experts(tasks)
            if sup.ets_window:
                ids = [i for i in self.supervision.erroneous(step, sup.ets_window) if i in self.by_id]
                supervised += self._experts([self.by_id[i] for i in ids[: sup.ets_max_tasks]])
        timings["time_reward_supervision"] = time.perf_counter() - t0

        loss_cfg = dataclasses.replace(cfg.loss, sft_weight=self.supervision.sft_weight or cfg.loss.sft_weight,
                                       unlikelihood_weight=sup.unlikelihood_weight or cfg.loss.unlikelihood_weight)
        result = self._update(trajs + supervised, on_policy + [False] * len(supervised), loss_config=loss_cfg,
                              old_logprobs=cfg.optim.old_logprobs, ref_model=self.ref_model,
                              probe=cfg.monitor.post_update_probe and cfg.monitor.policy != "off")
        timings["time_forward_backward"] = result.seconds_forward_backward
        timings["time_optimizer"] = result.seconds_optimizer
        if result.probe_forward_passes:
            timings["time_post_update_probe"] = result.seconds_probe
        if result.skipped:
            self.skipped_steps += 1
        else:
            self.scheduler.step()
        timings["time_sync"] = self._sync()

        sft_phase = 0
        if sup.scheme == "interleaved" and (step + 1) % sup.interleave_every == 0:
            sft_phase += sup.interleave_steps
        sft_phase += self.supervision.pending_sft_steps
        self.supervision.pending_sft_steps = 0
        if sft_phase:
            t0 = time.perf_counter()
            ids = self.supervision.erroneous(step + 1, max(sup.ets_window, sup.interleave_every, 1))
            pool = [self.by_id[i] for i in ids if i in self.by_id][: max(sup.ets_max_tasks, 1)] or tasks
            lr = (sup.sft_lr or cfg.optim.lr) * self.supervision.lr_scale
            for _ in range(sft_phase):
                self._sft_step(pool, lr)
            timings["time_sft_phase"] = time.perf_counter() - t0 + self._sync()

        metrics = {**rollout_stats, **result.metrics, **timings, "loss": result.loss, "grad_norm": result.grad_norm,
                   "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": self.skipped_steps,
                   "forward_passes": result.forward_passes, "ref_forward_passes": result.ref_forward_passes,
                   "probe_forward_passes": result.probe_forward_passes,
                   "supervised_trajectories": len(supervised), "unlikelihood_tokens": marked,
                   "sft_phase_steps": sft_phase, "sft_weight": self.supervision.sft_weight,
                   "weight_version": self.version}
        self.step += 1
        return metrics

    def act_on(self, step: int, metrics: dict) -> None:
        """The collapse monitor's verdict and, under `stabilize`, what the trainer does about it."""
        mon = self.cfg.monitor
        # Every rank judges rank 0's metrics, so all take the same actions.
        metrics.update(broadcast_object(metrics if self.main else None))
        verdict = self.monitor.update(metrics)
        metrics["collapse_warning"] = float(verdict.warning)
        # This step's rollouts judged the candidate checkpoint (the weights after the last step);
        # a post-update signal judges this step's new weights, not the candidate.
        if self.candidate_checkpoint is not None:
            if not (verdict.warning and verdict.rollouts_flagged):
                self.healthy_checkpoint = self.candidate_checkpoint
            self.candidate_checkpoint = None
        if not verdict.warning:
            return
        self.log.event(step, "warning", "collapse_warning: " + "; ".join(verdict.reasons), reasons=verdict.reasons)
        if mon.policy != "stabilize":
            return
        if self.supervision.sft_weight < mon.sft_weight_on_warning:
            self.supervision.sft_weight = mon.sft_weight_on_warning
            self.log.event(step, "action", f"synchronous SFT weight raised to {mon.sft_weight_on_warning}",
                           reason=verdict.reasons[0])
        if mon.interleave_sft_steps:
            self.supervision.pending_sft_steps += mon.interleave_sft_steps
            self.log.event(step, "action", f"{mon.interleave_sft_steps} SFT steps on erroneous tasks scheduled",
                           reason=verdict.reasons[0])
        if verdict.severe and self.supervision.rollbacks < mon.max_rollbacks:
            if self.healthy_checkpoint and Path(self.healthy_checkpoint).is_dir():
                self.rollback(step, verdict.reasons[0])      # makes its own LR cut
                return
            self.log.event(step, "action", "rollback wanted but no healthy checkpoint is kept",
                           reason=verdict.reasons[0])
        if mon.warning_lr_factor < 1:
            self._scale_lr(mon.warning_lr_factor)
            self.log.event(step, "action", f"LR cut to x{self.supervision.lr_scale:g}", reason=verdict.reasons[0])

    def _scale_lr(self, factor: float) -> None:
        """Multiply the RL learning rate by factor (floored at monitor.min_lr_scale), schedule kept."""
        sup = self.supervision
        sup.lr_scale = max(sup.lr_scale * factor, self.cfg.monitor.min_lr_scale)
        self.scheduler.base_lrs = [self.cfg.optim.lr * sup.lr_scale for _ in self.scheduler.base_lrs]
        lam = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = base * lam

    def rollback(self, step: int, reason: str) -> None:
        mon = self.cfg.monitor
        keep = self.supervision.state_dict()
        ckpt = self.healthy_checkpoint
        load_checkpoint(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        restore_rng=False)
        self.supervision.load_state_dict(keep)       # supervision settings survive the rollback
        self.supervision.rollbacks += 1
        self._scale_lr(mon.rollback_lr_factor)
        self._sync()
        self.log.event(step, "action", f"rolled back to {Path(ckpt).name} with LR x{self.supervision.lr_scale:g}",
                       reason=reason)

    def checkpoint(self) -> None:
        weights = optim = None
        if is_sharded(self.model):   # gather the shards onto rank 0 (a collective: every rank)
            weights, optim = gather_train_state(self.model, self.optimizer)
        path = None
        if self.main:      # data parallel: every rank holds the same weights and optimizer state
            path = str(save_checkpoint(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                       scheduler=self.scheduler, extra_state=self._extra(),
                                       keep_last=self.cfg.keep_last, model_state=weights,
                                       optimizer_state=optim, keep=self.healthy_checkpoint))
        self.candidate_checkpoint = broadcast_object(path)

    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.sft_warmup()
        if cfg.checkpoint_every and self.step == 0 and self.step < cfg.steps:
            self.checkpoint()       # the starting weights: the rollback target once step 1 confirms them
        while self.step < cfg.steps:
            step = self.step + 1                      # 1-based in logs
            metrics = self.rl_step()
            self.act_on(step, metrics)      # confirms the candidate checkpoint; may roll back to it
            self.log.log(step, metrics)
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.checkpoint()
        final = self.export()
        self.log.close()
        return {"steps": self.step, "skipped_steps": self.skipped_steps, "warnings": self.monitor.warnings,
                "final_model": final, "seconds": time.perf_counter() - t_start}

    def export(self) -> str | None:
        """The trained model as a Hugging Face dir (run_dir/final_model) for transformers and vLLM."""
        weights = full_state_dict(self.model) if is_sharded(self.model) else None   # collective
        if not self.main:
            return None
        return str(export_pretrained(self.model, self.tokenizer, self.run_dir / "final_model", state_dict=weights))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.dist.enabled:      # only the group we joined: in-process vLLM keeps its own
            cleanup()


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
