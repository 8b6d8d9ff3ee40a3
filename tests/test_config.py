"""Configs: presets, validation messages, YAML + dotted overrides, dict round trip."""

from __future__ import annotations

import pytest

from dlm_ray.config.schema import ModelConfig, PretrainConfig, SampleConfig
from dlm_ray.config.inference import GenerateConfig
from dlm_ray.config.io import ConfigError, load_config, parse_job_args, parse_overrides


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


def test_an_override_changes_only_the_field_it_names(tmp_path):
    # GenerateConfig's sample section defaults to 24/24/24, not SampleConfig's 32/32/32.
    cfg = load_config(GenerateConfig, None, ["--sample.temperature=1"])
    assert (cfg.sample.gen_length, cfg.sample.steps, cfg.sample.block_length, cfg.sample.temperature) == (24, 24, 24, 1)
    path = tmp_path / "g.yaml"
    path.write_text("sample:\n  gen_length: 64\n  steps: 16\n  block_length: 16\n")
    cfg = load_config(GenerateConfig, path, ["--sample.cache=dual"])
    assert (cfg.sample.gen_length, cfg.sample.steps, cfg.sample.block_length, cfg.sample.cache) == (64, 16, 16, "dual")
    # The same for every nested section of every config.
    base = load_config(PretrainConfig, None)
    for override, changed in [("--eval.sample.temperature=0.5", ("eval", "sample", "temperature")),
                              ("--train.lr=0.01", ("train", "lr")), ("--data.corpus.seed=3", ("data", "corpus", "seed"))]:
        cfg = load_config(PretrainConfig, None, [override])
        a, b = base.to_dict(), cfg.to_dict()
        node_a, node_b = a, b
        for key in changed[:-1]:
            node_a, node_b = node_a[key], node_b[key]
        assert node_a.pop(changed[-1]) != node_b.pop(changed[-1])
        assert a == b, override


def test_dict_fields_are_replaced_and_presets_follow_the_preset(tmp_path):
    cfg = load_config(PretrainConfig, None, ["--data.corpus.families={sudoku: 1}"])
    assert cfg.data.corpus.families == {"sudoku": 1.0}  # not merged into the default three
    path = tmp_path / "p.yaml"
    path.write_text("model:\n  preset: tiny\n  n_layers: 2\n")
    cfg = load_config(PretrainConfig, path, ["--model.preset=small"])
    assert cfg.model.d_model == 768 and cfg.model.n_layers == 2  # the preset's shape, the file's own field


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_job_args(GenerateConfig, ["--help"], "gen")
    out = capsys.readouterr().out
    assert "--sample.gen_length=24" in out and "--actors=[1, 2]" in out
    cfg, _ = parse_job_args(GenerateConfig, ["--sample.steps=12"], "gen")
    assert cfg.sample.steps == 12 and cfg.sample.gen_length == 24
