"""The masked-diffusion objective: masking, the 1/t-weighted loss and the NELBO estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dlm_ray.config.schema import DiffusionConfig
from dlm_ray.core.diffusion import apply_mask, diffusion_loss, mask_rows
from dlm_ray.core.likelihood import estimate_nelbo
from dlm_ray.core.model import Denoiser

V, MASK = 50, 49


def rows_of(x0: np.ndarray, *, epoch: int = 0, real: np.ndarray | None = None, first_index: int = 0) -> dict:
    """Rows as the pipeline hands them to ``mask_rows``: consecutive rows of one work item."""
    n = len(x0)
    index = np.arange(first_index, first_index + n)
    return {"input_ids": x0, "attention_mask": np.ones_like(x0) if real is None else real.astype(np.int8),
            "epoch": np.full(n, epoch), "row_id": index * 7919 + 11, "row_index": index}


def uniform_model(x, attention_mask=None):
    return torch.zeros(*x.shape, V)


def test_times_in_range_and_low_discrepancy():
    cfg = DiffusionConfig()
    x0 = np.zeros((64, 4), dtype=np.int64)
    t = mask_rows(rows_of(x0), cfg, seed=0, mask_id=MASK, strata=64)["t"]
    assert t.min() >= cfg.eps and t.max() <= 1.0
    # One t per 1/64 stratum: equal gaps, unlike i.i.d. draws.
    np.testing.assert_allclose(np.diff(np.sort(t)), (1 - cfg.eps) / 64, rtol=1e-4)
    # Any 64 consecutive rows of an item cover every stratum once, wherever the run starts.
    t = mask_rows(rows_of(x0, first_index=40), cfg, seed=0, mask_id=MASK, strata=64)["t"]
    strata = np.floor((t - cfg.eps) / (1 - cfg.eps) * 64).astype(int)
    assert sorted(strata) == list(range(64))
    iid = mask_rows(rows_of(x0), cfg.model_copy(update={"time_sampling": "uniform"}), seed=0, mask_id=MASK,
                    strata=64)["t"]
    assert np.diff(np.sort(iid)).std() > 1e-3


def test_masks_are_a_function_of_seed_epoch_and_row():
    cfg = DiffusionConfig()
    x0 = np.random.default_rng(0).integers(0, 40, (32, 16))
    a = mask_rows(rows_of(x0), cfg, seed=1, mask_id=MASK, strata=8)
    # The same rows split into other batches get the same masks and times.
    parts = [mask_rows({k: v[i:i + 5] for k, v in rows_of(x0).items()}, cfg, seed=1, mask_id=MASK, strata=8)
             for i in range(0, 32, 5)]
    assert np.array_equal(np.concatenate([p["loss_mask"] for p in parts]), a["loss_mask"])
    assert np.array_equal(np.concatenate([p["t"] for p in parts]), a["t"])
    other_epoch = mask_rows(rows_of(x0, epoch=1), cfg, seed=1, mask_id=MASK, strata=8)
    other_seed = mask_rows(rows_of(x0), cfg, seed=2, mask_id=MASK, strata=8)
    assert not np.array_equal(other_epoch["loss_mask"], a["loss_mask"])
    assert not np.array_equal(other_seed["loss_mask"], a["loss_mask"])


def test_mask_rate_matches_p():
    cfg = DiffusionConfig(time_sampling="uniform")
    x0 = np.random.default_rng(1).integers(0, 40, (400, 256))
    out = mask_rows(rows_of(x0), cfg, seed=2, mask_id=MASK)
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
    out = mask_rows(rows_of(x0, real=real), cfg, seed=0, mask_id=MASK, strata=64, prompt_len_R=np.full(64, 5))
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


@pytest.mark.parametrize("schedule", ["linear", "loglinear"])
def test_training_loss_is_unbiased_for_uniform_model(schedule):
    # E_t[(1/p) Σ_masked log V / n] = log V under either schedule: a missing or wrong 1/p(t) weight,
    # or a schedule whose p(t) is not the masking rate used, fails this.
    cfg = DiffusionConfig(time_sampling="uniform", schedule=schedule)
    x0 = np.random.default_rng(0).integers(0, 40, (2000, 32))
    b = mask_rows(rows_of(x0), cfg, seed=1, mask_id=MASK)
    loss = diffusion_loss(torch.zeros(*x0.shape, V), torch.from_numpy(x0), torch.from_numpy(b["loss_mask"]),
                          torch.from_numpy(b["p_mask"]), x0.size, mask_id=MASK)
    assert loss.item() == pytest.approx(math.log(V - 1), rel=0.03)


def test_loss_decreases_on_tiny_overfit(tiny_cfg):
    cfg = DiffusionConfig()
    model = Denoiser(tiny_cfg.model_copy(update={"vocab_size": V}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # One sequence repeated: memorisable in a few dozen steps, unlike random rows.
    x0 = np.tile(np.random.default_rng(0).integers(0, 40, (1, 16)), (8, 1))
    losses = []
    for step in range(150):
        b = mask_rows(rows_of(x0, epoch=step), cfg, seed=0, mask_id=MASK, strata=8)
        loss = diffusion_loss(model(torch.from_numpy(b["noisy_ids"])), torch.from_numpy(x0),
                              torch.from_numpy(b["loss_mask"]), torch.from_numpy(b["p_mask"]), x0.size, mask_id=MASK)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:10]), losses
