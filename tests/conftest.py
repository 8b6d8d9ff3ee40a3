"""Shared fixtures, and the test tiers.

A test that uses a fixture which starts Ray or DeepSpeed (``ray_cluster``, ``own_ray``,
``process_group``, or any fixture built on them) is marked ``slow`` here, at collection, so a new
test cannot forget it: ``pytest -m "not slow"`` is the fast tier of pure torch and config tests.
Every test has a timeout: ``FAST_TIMEOUT_S`` in the fast tier, ``timeout`` from pyproject.toml
(or the test's own mark) in the slow one.
"""

from __future__ import annotations

import pytest
import torch

from dlm_ray.config.schema import ModelConfig

SLOW_FIXTURES = {"ray_cluster", "own_ray", "process_group"}
FAST_TIMEOUT_S = 60


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        elif item.get_closest_marker("timeout") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    # Smaller than the preset so unit tests stay fast; the same code paths.
    return ModelConfig(preset="tiny", d_model=64, n_layers=2, n_heads=4, d_mlp=128, max_seq_len=128)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray, started by the first module that needs it and kept for the session (restarted if
    a test with its own cluster shut it down). ``address="local"`` never joins a stale cluster.

    4 logical CPUs on 2 cores: Train workers and Data actors together must never take every CPU,
    or the ingest that feeds the workers starves (a hang, not an error).
    """
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
