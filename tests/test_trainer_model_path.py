"""Where the trainer's model comes from: the user's dir, or the tiny model built in the run dir."""
import json

import pytest

from fastrl.config import load_config
from fastrl.trainer.config import TrainConfig
from fastrl.trainer.grpo import prepare_model_path


def test_tiny_model_is_built_once_and_a_changed_size_is_an_error(tmp_path):
    cfg = load_config(TrainConfig, {"run_dir": str(tmp_path), "model": {"tiny_layers": 2}})
    path = prepare_model_path(cfg)
    built = json.loads((tmp_path / "base_model" / "config.json").read_text())
    assert path == str(tmp_path / "base_model") and built["num_hidden_layers"] == 2
    stamp = (tmp_path / "base_model" / "model.safetensors").stat().st_mtime_ns
    assert prepare_model_path(cfg) == path                       # reused, not rebuilt
    assert (tmp_path / "base_model" / "model.safetensors").stat().st_mtime_ns == stamp
    deeper = load_config(TrainConfig, {"run_dir": str(tmp_path), "model": {"tiny_layers": 3}})
    with pytest.raises(ValueError, match=r"num_hidden_layers=2, but model.tiny_layers = 3"):
        prepare_model_path(deeper)
    wider = load_config(TrainConfig, {"run_dir": str(tmp_path), "model": {"tiny_layers": 2,
                                                                          "tiny_hidden_size": 64}})
    with pytest.raises(ValueError, match=r"hidden_size=128, but model.tiny_hidden_size = 64"):
        prepare_model_path(wider)


def test_a_user_model_dir_is_used_as_given(tmp_path):
    cfg = load_config(TrainConfig, {"run_dir": str(tmp_path), "model": {"path": "/some/model"}})
    assert prepare_model_path(cfg) == "/some/model"
    assert not (tmp_path / "base_model").exists()


def test_tiny_heads_set_the_head_count_and_bad_counts_are_rejected(tmp_path):
    from fastrl.config import ConfigError
    cfg = load_config(TrainConfig, {"run_dir": str(tmp_path),
                                    "model": {"tiny_hidden_size": 96, "tiny_heads": 6, "tiny_layers": 1}})
    built = json.loads((tmp_path / "base_model" / "config.json").read_text()
                       if prepare_model_path(cfg) else "{}")
    assert built["num_attention_heads"] == 6 and built["hidden_size"] == 96
    for heads in (0, 5, 7):
        with pytest.raises(ConfigError, match=f"model.tiny_heads = {heads} must be even"):
            load_config(TrainConfig, {"model": {"tiny_hidden_size": 96, "tiny_heads": heads}})
