"""The example configs shipped in configs/ load and validate."""
from pathlib import Path

import pytest

from fastrl.config import ConfigError, load_config
from fastrl.trainer.config import TrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.rollout.group_size > cfg.supervision.hbg_hinted + cfg.supervision.ops_replace


def test_examples_exist_and_bad_override_names_key():
    assert {p.name for p in CONFIGS} >= {"synthetic_cpu.yaml", "bfcl_qwen2.5_1.5b.yaml"}
    with pytest.raises(ConfigError, match=r"did you mean 'supervision.sft_weight'"):
        load_config(TrainConfig, CONFIGS[0], ["supervision.sft_weigth=0.3"])
    with pytest.raises(ConfigError, match="supervision.scheme"):
        load_config(TrainConfig, CONFIGS[0], ["supervision.scheme=sometimes"])
