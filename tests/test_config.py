"""Config loading: YAML + overrides, type checks, error messages, validate(), dump/save round trip."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from fastrl.config import ConfigError, dump_config, load_config, parse_yaml, save_config


@dataclass
class Optim:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    sft_lr: Optional[float] = None

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Supervision:
    scheme: Literal["sync", "interleaved"] = "sync"
    every_k: int = 0
    sft_steps: int = 0
    weights: dict[str, float] = field(default_factory=lambda: {"ops": 0.1})


@dataclass
class Train:
    name: str = "run"
    steps: int = 100
    seed: int = 0
    bf16: bool = True
    control_ids: list[int] = field(default_factory=list)
    out: Path = Path("runs")
    optim: Optim = field(default_factory=lambda: Optim(lr=2e-6))
    sup: Supervision = field(default_factory=Supervision)
    eval_sup: Optional[Supervision] = None

    def validate(self) -> None:
        if self.sup.scheme == "interleaved" and self.sup.every_k <= 0:
            raise ValueError("sup.scheme=interleaved needs sup.every_k > 0, "
                             f"got sup.every_k={self.sup.every_k}")


@dataclass
class Required:
    model: str
    rollouts: int = 8


def test_defaults_and_partial_sections_keep_factory_defaults():
    cfg = load_config(Train)
    assert cfg == Train()
    # Setting only optim.betas must keep the field's default lr (2e-6), not the class's (1e-6).
    cfg = load_config(Train, {"optim": {"betas": [0.8, 0.95]}})
    assert cfg.optim.lr == 2e-6 and cfg.optim.betas == (0.8, 0.95)


def test_yaml_file_and_overrides(tmp_path):
    lr = random.choice([1e-6, 3e-7, 5e-5])
    steps = random.randint(1, 10_000)
    (tmp_path / "c.yaml").write_text(
        f"name: demo\nsteps: {steps}\noptim:\n  lr: {lr:e}\nsup:\n  scheme: interleaved\n"
        "  every_k: 4\n")
    cfg = load_config(Train, tmp_path / "c.yaml",
                      ["optim.weight_decay=1e-2", "bf16=false", "control_ids=[5, 7, 11]",
                       "sup.weights.hbg=0.5", "name=007", "out=/tmp/x", "optim.sft_lr=1e-5",
                       "eval_sup.scheme=sync", "seed=1e3"])
    assert cfg.steps == steps and cfg.optim.lr == lr and cfg.name == "007"
    assert cfg.optim.weight_decay == 0.01 and cfg.bf16 is False
    assert cfg.control_ids == [5, 7, 11]
    assert cfg.sup == Supervision(scheme="interleaved", every_k=4, weights={"ops": 0.1, "hbg": 0.5})
    assert cfg.out == Path("/tmp/x") and cfg.optim.sft_lr == 1e-5 and cfg.seed == 1000
    assert cfg.eval_sup == Supervision(scheme="sync")
    # later overrides win; null resets an Optional
    cfg = load_config(Train, None, ["steps=3", "steps=4", "optim.sft_lr=1e-5", "optim.sft_lr=null"])
    assert cfg.steps == 4 and cfg.optim.sft_lr is None


def test_yaml_scalars_are_yaml12():
    assert parse_yaml("1e-6") == 1e-6 and isinstance(parse_yaml("1e-6"), float)
    assert parse_yaml("-2.5E+3") == -2500.0
    assert parse_yaml("on") == "on" and parse_yaml("true") is True
    assert parse_yaml("2024-01-01") == "2024-01-01"
    assert parse_yaml("[1, 2]") == [1, 2] and parse_yaml("null") is None


@pytest.mark.parametrize("overrides,fragment", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["stepz=1"], "unknown config key 'stepz' (did you mean 'steps'?)"),
    (["zzzz=1"], "unknown config key 'zzzz' (valid keys: name, steps"),
    (["sup.weights.hbg=high"], "'sup.weights.hbg' expects a float"),
    (["steps=1.5"], "'steps' expects an int"),
    (["bf16=yes"], "'bf16' expects a bool"),
    (["bf16=1"], "'bf16' expects a bool"),
    (["control_ids=[1, x]"], "'control_ids[1]' expects an int"),
    (["control_ids=3"], "'control_ids' expects a list"),
    (["optim.betas=[0.9]"], "'optim.betas' expects 2 items"),
    (["sup.scheme=async"], "'sup.scheme' must be one of ['sync', 'interleaved'], got 'async'"),
    (["steps=null"], "'steps' expects int, got null"),
    (["optim=3"], "'optim' must be a section"),
    (["steps.x=3"], "cannot set 'steps.x'"),
    (["steps"], "must look like key.sub=value"),
])
def test_bad_overrides_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(Train, {"steps": 5}, overrides)
    assert fragment in str(e.value)


def test_unknown_key_in_file_and_missing_required(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"'optim.weight_decy' \(did you mean 'optim.weight_decay'"):
        load_config(Train, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="missing required config key 'model'"):
        load_config(Required, {"rollouts": 4})
    assert load_config(Required, {}, ["model=Qwen/Qwen2.5-1.5B"]).model == "Qwen/Qwen2.5-1.5B"
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Train, tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(Train, tmp_path / "nope.yaml")


def test_validate_runs_on_nested_and_top_level():
    with pytest.raises(ConfigError, match=r"invalid config 'optim': lr must be positive, got -1"):
        load_config(Train, None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"sup.scheme=interleaved needs sup.every_k > 0"):
        load_config(Train, None, ["sup.scheme=interleaved"])
    assert load_config(Train, None, ["sup.scheme=interleaved", "sup.every_k=2"]).sup.every_k == 2


def test_dump_and_save_round_trip(tmp_path):
    cfg = load_config(Train, None, [f"optim.lr={random.uniform(1e-7, 1e-4)!r}",
                                    f"control_ids={random.sample(range(1000), 5)}",
                                    "eval_sup.every_k=3", "name=007"])
    d = dump_config(cfg)
    assert d["optim"]["betas"] == [0.9, 0.999] and d["out"] == "runs"
    assert load_config(Train, d) == cfg
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Train, path) == cfg
    assert "007" in path.read_text()
