"""Metrics log: JSON lines (tensors, numpy, non-finite values), flushing, events, resume
truncation, torn/corrupt lines, progress output and the optional TensorBoard writer."""
from __future__ import annotations

import io
import json
import math
import random
import sys
import types

import numpy as np
import pytest
import torch

from fastrl.trainer.metrics_log import MetricsLogger, read_events, read_metrics


def _strict_loads(line):
    def bad(c):
        raise AssertionError(f"non-standard JSON constant {c} in {line!r}")
    return json.loads(line, parse_constant=bad)


def random_metrics(rng):
    return {"reward_mean": torch.tensor(rng.random()), "success_rate": np.float32(rng.random()),
            "spike_count": np.int64(rng.randrange(100)), "lr": rng.choice([1e-6, 3e-7]),
            "loss": rng.uniform(-2, 2), "grad_norm": torch.tensor([rng.random()])[0],
            "ok": np.bool_(True)}


def test_log_round_trip_and_flush(tmp_path):
    rng = random.Random()
    logger = MetricsLogger(tmp_path, progress=False)
    sent = []
    for step in range(1, 6):
        m = random_metrics(rng)
        logger.log(step, m)
        sent.append(m)
        # flushed as written: readable while the logger is still open
        assert len(read_metrics(tmp_path)) == step
    logger.log(6, {"loss": float("nan"), "kl_mean": float("inf"), "x": -math.inf,
                   "hist": torch.tensor([1.0, float("nan")])})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    for line in lines:
        _strict_loads(line)    # every line stays strict JSON
    got = read_metrics(tmp_path)
    for rec, m in zip(got, sent):
        assert rec["reward_mean"] == pytest.approx(float(m["reward_mean"]), abs=1e-7)
        assert rec["success_rate"] == pytest.approx(float(m["success_rate"]))
        assert rec["spike_count"] == int(m["spike_count"]) and isinstance(rec["spike_count"], int)
        assert rec["lr"] == m["lr"] and rec["loss"] == m["loss"] and rec["ok"] is True
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    last = got[-1]
    assert math.isnan(last["loss"]) and last["kl_mean"] == math.inf and last["x"] == -math.inf
    assert last["hist"][0] == 1.0 and math.isnan(last["hist"][1])


def test_bad_values_name_the_key(tmp_path):
    with MetricsLogger(tmp_path, progress=False) as logger:
        with pytest.raises(TypeError, match="'policy'"):
            logger.log(1, {"loss": 1.0, "policy": object()})
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 3})
    assert read_metrics(tmp_path) == []


def test_events_and_resume_truncation(tmp_path):
    with MetricsLogger(tmp_path, progress=False) as logger:
        for step in range(1, 11):
            logger.log(step, {"loss": float(step)})
            if step % 3 == 0:
                logger.event(step, "warning", "intrusion high", intrusion_max=torch.tensor(0.5))
        logger.event(9, "action", "lr halved", lr=5e-7)
    ev = read_events(tmp_path)
    assert [(e["step"], e["kind"]) for e in ev] == [(3, "warning"), (6, "warning"),
                                                   (9, "warning"), (9, "action")]
    assert ev[0]["message"] == "intrusion high" and ev[0]["intrusion_max"] == 0.5
    # a killed process may leave a torn last line
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 1')
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))

    resume = random.randint(3, 8)
    with MetricsLogger(tmp_path, progress=False, resume_from_step=resume) as logger:
        assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, resume + 1))
        assert all(e["step"] <= resume for e in read_events(tmp_path))
        for step in range(resume + 1, 13):
            logger.log(step, {"loss": -float(step)})
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, 13))   # no duplicates, no gaps
    assert read_metrics(tmp_path)[resume]["loss"] == -(resume + 1.0)


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: corrupt"):
        read_metrics(tmp_path)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_output(tmp_path):
    out = io.StringIO()
    with MetricsLogger(tmp_path, total_steps=10, stream=out) as logger:
        logger.log(1, {"reward_mean": 0.25, "loss": 1.5, "lr": 1e-6, "other": 3.0})
        logger.log(5, {"reward_mean": 0.5, "success_rate": 0.4})
        logger.event(5, "action", "sft phase", steps=4)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0].startswith("step 1/10 [") and "reward 0.25" in lines[0]
    assert "lr 1.00e-06" in lines[0] and "other" not in lines[0]
    assert "step 5/10 [##########..........]  50%" in lines[1] and "succ 0.4" in lines[1]
    assert "s/step" in lines[1] and "eta" in lines[1]
    assert lines[2] == "[action] step 5: sft phase (steps=4)"

    tty = FakeTTY()
    with MetricsLogger(tmp_path / "b", total_steps=3, stream=tty) as logger:
        logger.log(1, {"reward_mean": 0.1})
        logger.log(2, {"reward_mean": 0.2})
        logger.event(2, "warning", "spike")
        logger.log(3, {"reward_mean": 0.3})
    text = tty.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    # the event goes on its own line, not over the progress bar
    assert "reward 0.2 |" in text and "\x1b[K\n[warning] step 2: spike\n\rstep 3/3" in text

    silent = io.StringIO()
    with MetricsLogger(tmp_path / "c", progress=False, stream=silent) as logger:
        logger.log(1, {"loss": 1.0})
        logger.event(1, "skip", "nan loss")
    assert silent.getvalue() == ""


def test_tensorboard_optional(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)

    calls = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def add_text(self, tag, text, step):
            calls.append(("text", tag, text, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    with MetricsLogger(tmp_path, tensorboard=True, progress=False, resume_from_step=0) as logger:
        logger.log(1, {"loss": 2.0, "note": "x", "flag": True})
        logger.event(1, "warning", "spike")
    assert calls == [("init", str(tmp_path / "tensorboard"), 1), ("scalar", "loss", 2.0, 1),
                     ("text", "events/warning", "spike", 1), ("close",)]
