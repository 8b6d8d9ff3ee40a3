"""Shared fixtures: the tiny model config and small stub models for the samplers."""

from __future__ import annotations

import pytest
import torch

from dlm_ray.config import ModelConfig


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    # Smaller than the preset so unit tests stay fast; the same code paths.
    return ModelConfig(preset="tiny", d_model=64, n_layers=2, n_heads=4, d_mlp=128, max_seq_len=128)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
