"""Confidence-aware parallel training (CAP): the entropy term on positions the model already gets
right, against a hand transcription; weight 0 is the plain bound bit for bit (full and block
objectives); its gradient sharpens only the right positions; the logged loss stays the bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dlm_ray.config.schema import DataConfig, DiffusionConfig, ModelConfig, PretrainConfig
from dlm_ray.core.diffusion import cap_term, confident_entropy, diffusion_loss, mask_rows
from dlm_ray.core.kinds import kind_of
from dlm_ray.core.model import Denoiser
from dlm_ray.train.fit import _loss

V, MASK, L = 12, 11, 16


def _batch(R: int = 4, block_size: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Masked pretraining rows as the pipeline makes them (one row with padding)."""
    rng = np.random.default_rng(seed)
    am = np.ones((R, L), dtype=np.int8)
    am[0, -3:] = 0
    rows = {"input_ids": rng.integers(0, MASK, (R, L)).astype(np.int32), "attention_mask": am,
            "epoch": np.zeros(R, dtype=np.int32), "row_id": np.arange(R), "row_index": np.arange(R)}
    out = mask_rows(rows, DiffusionConfig(), seed=seed, mask_id=MASK, block_size=block_size)
    return {k: torch.as_tensor(v) for k, v in out.items()}


def _hand_cap(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, n: int) -> float:
    """The rule as written: for each masked position whose argmax (mask token excluded) is the clean
    token, add -Σ_v p_v log p_v; divide the sum by the real tokens."""
    total = 0.0
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1]):
            if not masked[b, i]:
                continue
            row = [float(z) for z in logits[b, i]]
            row[MASK] = -math.inf
            top = max(range(len(row)), key=lambda v: row[v])
            if top != int(x0[b, i]):
                continue
            z = sum(math.exp(r - row[top]) for r in row)
            probs = [math.exp(r - row[top]) / z for r in row]
            total -= sum(p * math.log(p) for p in probs if p > 0)
    return total / n


def test_term_equals_hand_transcription():
    torch.manual_seed(0)
    b = _batch()
    x0, masked = b["input_ids"].long(), b["loss_mask"]
    logits = torch.randn(*x0.shape, V) * 2
    # Make about half of the masked positions right, so both cases occur.
    right = masked & (torch.rand(x0.shape) < 0.5)
    logits[right] = logits[right].scatter(-1, x0[right][:, None], 10.0)
    assert 0 < int((confident_entropy(logits, x0, masked, MASK) > 0).sum()) < int(masked.sum())
    n = int(b["attention_mask"].sum())
    ours = cap_term(logits, x0, masked, n, mask_id=MASK)
    assert float(ours) == pytest.approx(_hand_cap(logits, x0, masked, n), rel=1e-5)


@pytest.mark.parametrize("attention", ["full", "block_causal"])
def test_weight_zero_is_the_plain_bound_bit_for_bit(attention):
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, d_mlp=64, max_seq_len=L,
                      attention=attention, block_size=4)
    torch.manual_seed(0)
    model = Denoiser(cfg)
    kind = kind_of(cfg)
    b = _batch(block_size=4 if attention == "block_causal" else None)
    x0, am = b["input_ids"].long(), b["attention_mask"].long()
    logits = model(b["noisy_ids"].long(), am, **({"clean_ids": x0} if attention == "block_causal" else {}))
    plain = diffusion_loss(logits, x0, b["loss_mask"], b["p_mask"], am.sum(), mask_id=MASK)
    figures: dict[str, torch.Tensor] = {}
    ours = kind.loss(model, b, mask_id=MASK, cap_weight=0.0, figures=figures)
    assert torch.equal(ours, plain) and torch.equal(figures["loss"], plain)
    assert "cap_entropy" not in figures
    # With a weight: the objective is the bound plus the weighted term, the logged loss the bound.
    figures = {}
    ours = kind.loss(model, b, mask_id=MASK, cap_weight=0.5, figures=figures)
    cap = cap_term(logits, x0, b["loss_mask"], am.sum(), mask_id=MASK)
    assert torch.equal(figures["loss"], plain) and torch.equal(figures["cap_entropy"], cap)
    assert float(ours.detach()) == pytest.approx(float((plain + 0.5 * cap).detach()), rel=1e-6)
    assert float(cap.detach()) > 0  # a random model is right somewhere


def test_gradient_sharpens_only_right_positions():
    torch.manual_seed(1)
    b = _batch()
    x0, masked = b["input_ids"].long(), b["loss_mask"]
    base = torch.randn(*x0.shape, V)
    right = masked & (torch.rand(x0.shape) < 0.5)
    base[right] = base[right].scatter(-1, x0[right][:, None], 3.0)
    logits = base.clone().requires_grad_(True)
    cap_term(logits, x0, masked, int(b["attention_mask"].sum()), mask_id=MASK).backward()
    hit = logits.grad.abs().sum(-1) > 0
    is_right = masked & (base.masked_fill(torch.arange(V) == MASK, -math.inf).argmax(-1) == x0)
    assert torch.equal(hit, is_right) and bool(is_right.any())
    # A small step against the gradient lowers the entropy at every right position and keeps the
    # argmax there.
    stepped = (base - 0.5 * logits.grad).masked_fill(torch.arange(V) == MASK, -math.inf)
    before = confident_entropy(base, x0, masked, MASK)
    after = confident_entropy(stepped, x0, masked, MASK)
    assert bool((after[is_right] < before[is_right]).all())
    assert torch.equal(stepped.argmax(-1)[is_right], x0[is_right])


def test_trainer_loss_logs_the_bound_and_the_term_apart(tiny_cfg):
    cfg = PretrainConfig(model=tiny_cfg.model_copy(update={"vocab_size": V, "max_seq_len": L}),
                         data=DataConfig(seq_len=L), diffusion=DiffusionConfig(cap_weight=2.0))
    torch.manual_seed(0)
    model = Denoiser(cfg.model)
    b = _batch()
    objective, figures = _loss(model, b, cfg, MASK)
    assert set(figures) == {"loss", "cap_entropy"}
    expected = figures["loss"] + 2.0 * figures["cap_entropy"]
    assert float(objective.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    plain, figures0 = _loss(model, b, cfg.model_copy(update={"diffusion": DiffusionConfig()}), MASK)
    assert torch.equal(plain, figures["loss"]) and set(figures0) == {"loss"}


def test_cap_refused_for_an_autoregressive_model():
    with pytest.raises(ValueError, match="cap_weight.*diffusion models"):
        PretrainConfig(model=ModelConfig(preset="tiny", attention="causal"), diffusion=DiffusionConfig(cap_weight=1.0))
    with pytest.raises(ValueError, match="cap_weight"):
        DiffusionConfig(cap_weight=-1.0)
