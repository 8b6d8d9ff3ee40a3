"""The masked-diffusion objective: masking, the 1/t-weighted loss and the NELBO estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dlm_ray.config import DiffusionConfig
from dlm_ray.diffusion import (
    apply_mask, diffusion_loss, estimate_nelbo, mask_batch, mask_probability, sample_times,
)
from dlm_ray.model import Denoiser

V, MASK = 50, 49


def uniform_model(x, attention_mask=None):
    return torch.zeros(*x.shape, V)


def test_times_in_range_and_low_discrepancy():
    cfg = DiffusionConfig()
    t = sample_times(64, cfg, np.random.default_rng(0))
    assert t.min() >= cfg.eps and t.max() <= 1.0
    gaps = np.diff(np.sort(t))
    # One t per 1/64 stratum: equal gaps, unlike i.i.d. draws.
    np.testing.assert_allclose(gaps, (1 - cfg.eps) / 64, rtol=1e-6)
    iid = sample_times(64, cfg.model_copy(update={"time_sampling": "uniform"}), np.random.default_rng(0))
    assert np.diff(np.sort(iid)).std() > 1e-3


def test_mask_rate_matches_p():
    cfg = DiffusionConfig(time_sampling="uniform")
    x0 = np.random.default_rng(1).integers(0, 40, (400, 256))
    out = mask_batch(x0, np.ones_like(x0, bool), cfg, np.random.default_rng(2), mask_id=MASK)
    rate = out["loss_mask"].mean(1)
    np.testing.assert_allclose(rate, out["p_mask"], atol=0.12)
    assert abs((rate - out["p_mask"]).mean()) < 0.01
    assert ((out["noisy_ids"] == MASK) == out["loss_mask"]).all()
    assert (out["noisy_ids"][~out["loss_mask"]] == x0[~out["loss_mask"]]).all()


def test_padding_and_prompt_never_masked():
    cfg = DiffusionConfig()
    x0 = np.full((64, 20), 3)
    real = np.ones_like(x0, bool)
    real[:, 15:] = False
    prompt_len = np.full(64, 5)
    out = mask_batch(x0, real, cfg, np.random.default_rng(0), mask_id=MASK, prompt_len_B=prompt_len)
    assert not out["loss_mask"][:, 15:].any() and not out["loss_mask"][:, :5].any()
    assert out["loss_mask"][:, 5:15].any()


def test_numpy_and_torch_masking_agree():
    rng = np.random.default_rng(0)
    x0, u, p = rng.integers(0, 40, (4, 9)), rng.random((4, 9)), np.array([0.1, 0.5, 0.9, 1.0])
    keep = np.ones((4, 9), bool)
    xn, mn = apply_mask(x0, p, u, keep, MASK)
    xt, mt = apply_mask(torch.from_numpy(x0), torch.from_numpy(p), torch.from_numpy(u), torch.from_numpy(keep), MASK)
    assert (xt.numpy() == xn).all() and (mt.numpy() == mn).all()


def test_estimate_nelbo_uniform_is_log_v():
    x = torch.randint(0, 40, (3, 30))
    am = torch.ones_like(x)
    am[0, :10] = 0  # padded row: per-real-token normalisation must still hold
    nelbo = estimate_nelbo(uniform_model, x, mask_id=MASK, num_samples=4, attention_mask=am)
    # The mask token is excluded from predictions: V - 1 candidates.
    torch.testing.assert_close(nelbo, torch.full((3,), math.log(V - 1)), atol=1e-4, rtol=1e-4)


def test_estimate_nelbo_perfect_model_is_zero():
    x = torch.randint(0, 40, (2, 16))

    def oracle(xt, attention_mask=None):
        return torch.nn.functional.one_hot(x, V).float() * 100

    assert estimate_nelbo(oracle, x, mask_id=MASK, num_samples=3).abs().max() < 1e-3


def test_training_loss_is_unbiased_for_uniform_model():
    # E_t[(1/p) Σ_masked log V / n] = log V: a missing or wrong 1/t weight fails this.
    cfg = DiffusionConfig(time_sampling="uniform")
    x0 = np.random.default_rng(0).integers(0, 40, (2000, 32))
    b = mask_batch(x0, np.ones_like(x0, bool), cfg, np.random.default_rng(1), mask_id=MASK)
    loss = diffusion_loss(torch.zeros(*x0.shape, V), torch.from_numpy(x0), torch.from_numpy(b["loss_mask"]),
                          torch.from_numpy(b["p_mask"]), x0.size, mask_id=MASK)
    assert loss.item() == pytest.approx(math.log(V - 1), rel=0.03)


def test_loss_decreases_on_tiny_overfit(tiny_cfg):
    cfg = DiffusionConfig()
    model = Denoiser(tiny_cfg.model_copy(update={"vocab_size": V}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # One sequence repeated: memorisable in a few dozen steps, unlike random rows.
    x0 = np.tile(np.random.default_rng(0).integers(0, 40, (1, 16)), (8, 1))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(150):
        b = mask_batch(x0, np.ones_like(x0, bool), cfg, rng, mask_id=MASK)
        loss = diffusion_loss(model(torch.from_numpy(b["noisy_ids"])), torch.from_numpy(x0),
                              torch.from_numpy(b["loss_mask"]), torch.from_numpy(b["p_mask"]), x0.size, mask_id=MASK)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:10]), losses


def test_schedules():
    cfg = DiffusionConfig(eps=0.01)
    assert mask_probability(np.array([0.0]), cfg)[0] == pytest.approx(0.01)
    assert mask_probability(np.array([1.0]), cfg.model_copy(update={"schedule": "loglinear"}))[0] == pytest.approx(0.99)
