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


def pytest_sessionstart(session: pytest.Session) -> None:
    # A DeepSpeed op build killed in an earlier run leaves a lock every later build waits on forever.
    from dlm_ray.train.op_builds import clear_stale_build_locks

    clear_stale_build_locks()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    # Smaller than the preset so unit tests stay fast; the same code paths.
    return ModelConfig(preset="tiny", d_model=64, n_layers=2, n_heads=4, d_mlp=128, max_seq_len=128)


# What the Llama/Qwen families add to LLaDA's block, all at once: grouped-query attention (4 query
# heads on 2 key/value heads), a head width that is not d_model / n_heads, q/k/v biases, Qwen3's q/k
# norms, tied embeddings, and (diffusion models adapted from autoregressive ones) the shifted head.
QWEN_SHAPE = {"n_kv_heads": 2, "head_dim": 8, "qkv_bias": True, "qk_norm": True, "tie_embeddings": True,
              "shift_logits": True}
FAMILIES = {"llada": {}, "qwen": QWEN_SHAPE}


def family_model(cfg: ModelConfig, family: str, **update: object) -> torch.nn.Module:
    """A ``Denoiser`` of ``cfg`` in one of ``FAMILIES``' shapes, with every weight random (biases and
    norm gains too, which start at 0 and 1 and would hide a wrong layout)."""
    from dlm_ray.core.model import Denoiser

    shape = dict(FAMILIES[family])
    if update.get("attention") == "causal":
        shape.pop("shift_logits", None)
    model = Denoiser(ModelConfig.model_validate({**cfg.model_dump(), **shape, **update}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0 if name.endswith(".bias") else 1))
    return model


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
