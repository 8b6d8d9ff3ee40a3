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


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session. ``address="local"`` never joins a stale cluster.

    4 logical CPUs on 2 cores: Train workers and Data actors together must never take every CPU,
    or the ingest that feeds the workers starves (a hang, not an error).
    """
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
