"""The SFT warm-up learning-rate schedule and its config checks."""
import math
import random

import pytest

from fastrl.config import ConfigError, load_config
from fastrl.trainer.config import TrainConfig
from fastrl.trainer.grpo import sft_warmup_lr


def test_constant_schedule_is_flat():
    cfg = load_config(TrainConfig, {"sft_warmup_steps": 7, "sft_warmup_lr": 1e-3})
    assert [sft_warmup_lr(cfg, i) for i in range(7)] == [1e-3] * 7


def test_cosine_schedule_warms_up_then_decays_to_ten_percent():
    rng = random.Random()
    steps, lr = rng.randint(40, 400), rng.uniform(1e-4, 1e-2)
    cfg = load_config(TrainConfig, {"sft_warmup_steps": steps, "sft_warmup_lr": lr,
                                    "sft_warmup_schedule": "cosine"})
    lrs = [sft_warmup_lr(cfg, i) for i in range(steps)]
    warm = max(1, round(0.05 * steps))
    # Linear warm-up to the peak, independent formula.
    for i in range(warm):
        assert lrs[i] == pytest.approx(lr * (i + 1) / warm)
    assert max(lrs) == pytest.approx(lr)
    # Then non-increasing, following 0.1 + 0.9 * (1 + cos(pi t)) / 2, ending at 10%.
    after = lrs[warm:]
    assert all(a >= b - 1e-15 for a, b in zip(after, after[1:]))
    assert after[-1] == pytest.approx(0.1 * lr)
    mid = warm + (steps - warm - 1) // 2
    t = (mid - warm) / (steps - warm - 1)
    assert lrs[mid] == pytest.approx(lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t))))


@pytest.mark.parametrize("key,value", [("sft_warmup_schedule", "linear"), ("sft_warmup_tasks", 0)])
def test_bad_sft_warmup_settings_name_the_key(key, value):
    with pytest.raises((ConfigError, ValueError), match=key):
        load_config(TrainConfig, {key: value})
