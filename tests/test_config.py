"""Configs: presets, validation messages, YAML + dotted overrides, dict round trip."""

from __future__ import annotations

import pytest

from dlm_ray.config import (
    ConfigError, ModelConfig, PretrainConfig, SampleConfig, load_config, parse_overrides,
)


def test_overrides_keep_types_and_nest():
    out = parse_overrides(["--train.lr=3e-4", "--model.preset", "small", "--train.betas=[0.9, 0.95]"])
    assert out == {"train": {"lr": 3e-4, "betas": [0.9, 0.95]}, "model": {"preset": "small"}}


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: x\ntrain:\n  lr: 0.01\n  batch_size: 8\n")
    cfg = load_config(PretrainConfig, path, ["--train.lr=0.002"])
    assert cfg.run_name == "x" and cfg.train.lr == 0.002 and cfg.train.batch_size == 8


def test_dict_round_trip():
    cfg = load_config(PretrainConfig, None, ["--model.preset=tiny", "--eval.sample.steps=12"])
    again = PretrainConfig.model_validate(cfg.to_dict())
    assert again == cfg and again.eval.sample.steps == 12


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_config(PretrainConfig, None, ["--train.lrr=1"])


def test_bad_values_are_explained():
    with pytest.raises(ConfigError, match="data.seq_len=512 exceeds model.max_seq_len=256"):
        load_config(PretrainConfig, None, ["--data.seq_len=512"])
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(PretrainConfig, None, ["--train.lr=-1"])
    with pytest.raises(ValueError, match="not divisible by block_length"):
        SampleConfig(gen_length=30, block_length=8, steps=8)
    with pytest.raises(ValueError, match="not divisible by the number of blocks"):
        SampleConfig(gen_length=32, block_length=8, steps=6)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig(preset="huge")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelConfig(d_model=130, n_heads=4)


def test_preset_fields_can_be_overridden():
    cfg = ModelConfig(preset="8b", n_layers=2)
    assert cfg.d_model == 4096 and cfg.vocab_size == 126464 and cfg.rope_theta == 5e5 and cfg.n_layers == 2


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, tmp_path / "nope.yaml")
