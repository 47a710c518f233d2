"""The training configuration: plain dataclasses, loaded from YAML by fastrl.config.load_config
(`fastrl train CONFIG --set optim.lr=1e-6`). Every field is documented where it is declared."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastrl.ops import PolicyLossConfig
from fastrl.trainer.monitor import MonitorConfig


@dataclass
class ModelConfig:
    path: str | None = None            # a Hugging Face model dir; None builds the tiny model below
    tiny_hidden_size: int = 128        # tiny model (fastrl.models.build_tiny_model)
    tiny_layers: int = 2
    tiny_heads: int = 4                # head_dim = tiny_hidden_size / tiny_heads (vLLM on CPU: 32, 64, ...)
    tiny_seed: int = 0
    dtype: str = "float32"             # float32 | bfloat16 (GPU): the weights' own dtype
    autocast: str | None = None        # bfloat16 | float16: mixed precision (fp32 weights, matmuls in
                                       # this dtype; the rollout engine samples in it); needs dtype float32
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False
    liger_kernels: bool = False        # Liger RMSNorm/RoPE/SwiGLU on GPU when installed

    def validate(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"model.autocast must be null, bfloat16 or float16, got {self.autocast!r}")
        if self.autocast is not None and self.dtype != "float32":
            raise ValueError(f"model.autocast = {self.autocast} needs model.dtype = float32 (the master "
                             f"weights), got model.dtype = {self.dtype}")
        if self.tiny_heads < 1 or self.tiny_hidden_size % self.tiny_heads or self.tiny_heads % 2:
            # build_tiny_model uses 2 key-value heads (grouped-query attention).
            raise ValueError(f"model.tiny_heads = {self.tiny_heads} must be even and divide "
                             f"model.tiny_hidden_size = {self.tiny_hidden_size}")


@dataclass
class EnvConfig:
    name: str = "synthetic"            # synthetic | bfcl
    train_tasks: int = 512
    eval_tasks: int = 64
    difficulty: int | None = None      # synthetic: max tool calls per task (1-4); None = mixed
    eval_splits: list[str] = field(default_factory=lambda: ["test", "content_shift", "format_shift"])
    bfcl_categories: list[str] = field(default_factory=lambda: ["base", "miss_param", "miss_func"])
    format_weight: float = 0.2         # reward = format_weight * format + correct_weight * correct
    correct_weight: float = 1.0

    def validate(self) -> None:
        if self.name not in ("synthetic", "bfcl"):
            raise ValueError(f"env.name must be 'synthetic' or 'bfcl', got {self.name!r}")


@dataclass
class RolloutConfig:
    engine: str = "auto"               # auto (vLLM where installed) | vllm | hf
    tasks_per_step: int = 8
    group_size: int = 8                # G rollouts per task
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128          # per assistant turn
    max_turns: int = 6
    max_total_tokens: int = 2048
    gpu_memory_utilization: float = 0.5  # vLLM on GPU
    tensor_parallel_size: int = 1      # vLLM on GPU

    def validate(self) -> None:
        if self.engine not in ("auto", "vllm", "hf"):
            raise ValueError(f"rollout.engine must be auto, vllm or hf, got {self.engine!r}")
        if self.group_size < 1 or self.tasks_per_step < 1:
            raise ValueError("rollout.group_size and rollout.tasks_per_step must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"         # constant | cosine (after warm-up, to 10% at the last step)
    micro_batch_tokens: int = 4096     # token budget of one packed micro-batch
    old_logprobs: str = "rollout"      # rollout (engine log-probs) | on_policy (ratio 1)
    std_normalize: bool = True         # GRPO advantages divide by the group std (False: Dr.GRPO)

    def validate(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be constant or cosine, got {self.schedule!r}")
        if self.old_logprobs not in ("rollout", "on_policy"):
            raise ValueError(f"optim.old_logprobs must be rollout or on_policy, got {self.old_logprobs!r}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {self.betas}")


@dataclass
class SupervisionConfig:
    """The supervisory signals (OPS, HBG, ETS; see the README) and how they are scheduled."""
    scheme: str = "sync"               # none | sync | interleaved
    sft_weight: float = 0.0            # sync: weight of the SFT term on expert tokens (OPS + ETS)
    ops_expert_sft: bool = True        # OPS: expert trajectories of this step's tasks get SFT
    ops_replace: int = 0               # OPS: k of the G rollouts of a group replaced by the expert
    hbg_hinted: int = 0                # HBG: h of the G rollouts sampled with the task's hint
    hbg_importance: bool = False       # HBG: keep the hinted rollout log-probs as the behaviour
                                       #   policy (clipped ratio) instead of ratio 1
    ets_window: int = 0                # ETS: tasks that failed within the last N steps get SFT
    ets_max_tasks: int = 8             # ETS: at most this many erroneous tasks per step
    unlikelihood_weight: float = 0.0   # ETS: -log(1-p) on control tokens of malformed turns
    interleave_every: int = 0          # interleaved: every k RL steps ...
    interleave_steps: int = 0          # ... run m SFT steps (experts of this step's and failed tasks)
    sft_lr: float | None = None        # learning rate of SFT phases (None: the RL rate)

    def validate(self) -> None:
        if self.scheme not in ("none", "sync", "interleaved"):
            raise ValueError(f"supervision.scheme must be none, sync or interleaved, got {self.scheme!r}")
        if self.scheme == "interleaved" and (self.interleave_every < 1 or self.interleave_steps < 1):
            raise ValueError("supervision.scheme=interleaved needs supervision.interleave_every >= 1 "
                             "and supervision.interleave_steps >= 1")
        if min(self.ops_replace, self.hbg_hinted, self.ets_window) < 0:
            raise ValueError("supervision.ops_replace, hbg_hinted and ets_window must be >= 0")


@dataclass
class TrainConfig:
    run_dir: str = "runs/fastrl"
    seed: int = 0
    steps: int = 20                    # RL steps
    sft_warmup_steps: int = 0          # SFT steps on expert trajectories before RL
    sft_warmup_lr: float = 3e-3
    sft_warmup_tasks: int | None = None  # expert trajectories per warm-up step (None: rollout.tasks_per_step)
    sft_warmup_schedule: str = "constant"  # constant | cosine (5% linear warm-up, then down to 10%)
    checkpoint_every: int = 10
    keep_last: int = 3
    tensorboard: bool = False
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> None:
        g = self.rollout.group_size
        if self.supervision.ops_replace + self.supervision.hbg_hinted >= g:
            raise ValueError(f"supervision.ops_replace ({self.supervision.ops_replace}) + supervision.hbg_hinted "
                             f"({self.supervision.hbg_hinted}) must leave at least one plain rollout of "
                             f"rollout.group_size ({g})")
        if self.steps < 0 or self.sft_warmup_steps < 0:
            raise ValueError("steps and sft_warmup_steps must be >= 0")
        if self.sft_warmup_schedule not in ("constant", "cosine"):
            raise ValueError(f"sft_warmup_schedule must be constant or cosine, got {self.sft_warmup_schedule!r}")
        if self.sft_warmup_tasks is not None and self.sft_warmup_tasks < 1:
            raise ValueError(f"sft_warmup_tasks must be >= 1 (or null), got {self.sft_warmup_tasks}")
