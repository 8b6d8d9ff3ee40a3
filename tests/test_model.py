"""The denoiser: shapes, padding, bidirectionality, parameter counts."""

from __future__ import annotations

import pytest
import torch

from dlm_ray.config.schema import ModelConfig
from dlm_ray.core.model import Denoiser, flops_per_token, num_params


def test_shapes_and_dtype(tiny_cfg):
    model = Denoiser(tiny_cfg)
    logits = model(torch.randint(0, 250, (3, 17)))
    assert logits.shape == (3, 17, tiny_cfg.vocab_size) and logits.dtype == torch.float32


def test_bidirectional(tiny_cfg):
    model = Denoiser(tiny_cfg).eval()
    x = torch.randint(0, 250, (1, 12))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 250
    # Changing the last token changes the first position's prediction: attention is not causal.
    assert not torch.allclose(model(x)[0, 0], model(y)[0, 0])


def test_padding_is_ignored_and_positions_shift(tiny_cfg):
    model = Denoiser(tiny_cfg).eval()
    x = torch.randint(0, 250, (1, 10))
    padded = torch.cat([torch.full((1, 4), 7), x], 1)
    am = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], 1).long()
    ref = model(x)
    out = model(padded, am)[:, 4:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # What sits in the padding does not matter either.
    padded2 = padded.clone()
    padded2[0, :4] = 99
    torch.testing.assert_close(model(padded2, am)[:, 4:], ref, atol=1e-5, rtol=1e-5)


def test_param_count_exact_and_presets():
    for preset in ("tiny", "small"):
        cfg = ModelConfig(preset=preset)
        if preset == "tiny":
            assert num_params(cfg) == sum(p.numel() for p in Denoiser(cfg).parameters())
            assert num_params(cfg) < 5_000_000
    small = num_params(ModelConfig(preset="small"))
    assert 100e6 < small < 160e6
    assert 0.9e9 < num_params(ModelConfig(preset="1b")) < 1.5e9
    # LLaDA-8B's shape: about 8B parameters.
    assert 7.5e9 < num_params(ModelConfig(preset="8b")) < 8.5e9


def test_flops_per_token_grows_with_context():
    cfg = ModelConfig(preset="tiny")
    n = num_params(cfg, include_embedding=False)
    assert flops_per_token(cfg, 1) == pytest.approx(6 * n + 12 * cfg.n_layers * cfg.d_model)
    assert flops_per_token(cfg, 256) > flops_per_token(cfg, 64)


def test_too_long_raises(tiny_cfg):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Denoiser(tiny_cfg)(torch.zeros(1, tiny_cfg.max_seq_len + 1, dtype=torch.long))


def test_bf16_forward(tiny_cfg):
    model = Denoiser(tiny_cfg).to(torch.bfloat16)
    logits = model(torch.randint(0, 250, (2, 9)), torch.ones(2, 9, dtype=torch.long))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32(tiny_cfg):
    model = Denoiser(tiny_cfg).eval()
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(x)
        out = model.to("cuda", torch.bfloat16)(x.cuda()).float().cpu()
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1
