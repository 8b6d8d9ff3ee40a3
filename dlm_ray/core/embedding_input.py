"""What an embedding-diffusion denoiser (``model.noise: gaussian``) reads instead of token ids.

The model's own embedding table, each row normalised to length sqrt(D) (CDCD, Plaid), gives the
clean embeddings e. A position's input is its noisy embedding z_t, scaled down where it is mostly
noise (the given positions, a prompt or padding, read their clean embedding: noise level t = 1),
plus an embedding of its noise level,
plus a projection of the model's previous estimate of the clean embedding (self-conditioning;
absent, it adds nothing). The estimate is score interpolation: ê = softmax(logits) · Ē, the
expected clean embedding under the model's prediction.

Every matrix is read through its module's call (``TokenEmbedding(..., how=...)``), never as an
attribute from outside it: under ZeRO-3 a parameter is gathered only while its module runs.

Shape legend:  B batch, L sequence length, D d_model, V vocab, F time features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TokenEmbedding(nn.Embedding):
    """The token embedding: a lookup (``how="lookup"``, every model's input), the normalised rows
    of ids (``"normalised"``: e), or the expected normalised row under probabilities [..., V]
    (``"expected"``: ê)."""

    def forward(self, x: torch.Tensor, how: str = "lookup") -> torch.Tensor:  # type: ignore[override]
        if how == "lookup":
            return super().forward(x)
        if how == "normalised":
            return normalise(super().forward(x))
        if how == "expected":
            table_VD = normalise(self.weight)
            return x.to(table_VD.dtype) @ table_VD
        raise ValueError(f"how={how!r}: 'lookup', 'normalised' or 'expected'")


def normalise(x_ND: torch.Tensor) -> torch.Tensor:
    """Each row scaled to length sqrt(D): unit variance per coordinate, like the noise it meets."""
    x32 = x_ND.float()
    return (x32 * math.sqrt(x32.shape[-1]) / x32.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(x_ND.dtype)


def time_features(t_BL: torch.Tensor, width: int) -> torch.Tensor:
    """Sinusoidal features [B, L, width] of noise levels in [0, 1] (periods from 1/1000 of the range
    up to about six times it), as diffusion models embed their time."""
    half = width // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t_BL.device, dtype=torch.float32) / half)
    angles = 1000.0 * t_BL.float()[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class NoiseInput(nn.Module):
    """The inputs beyond z_t: the noise level's embedding (features -> Linear -> SiLU -> Linear) and
    the self-conditioning projection (no bias, so a missing estimate adds exactly nothing)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.width = d_model
        self.time_in = nn.Linear(d_model, d_model)
        self.time_out = nn.Linear(d_model, d_model)
        self.self_cond = nn.Linear(d_model, d_model, bias=False)

    def forward(self, z_BLD: torch.Tensor, t_BL: torch.Tensor, estimate_BLD: torch.Tensor | None) -> torch.Tensor:
        """The transformer's input [B, L, D]. z_t comes in scaled by its signal's share of its norm,
        c(t) = t / sqrt(t² + (1 − t)²) (1 at a given position, 0 at pure noise): near t = 0 the
        noise would otherwise fill the residual stream and scramble attention, and a position must
        then read its context, as a masked position does. Given positions (t = 1) never read an
        estimate: they are known, in training as in sampling."""
        t_BL1 = t_BL[..., None].to(z_BLD.dtype)
        scale_BL1 = t_BL1 / (t_BL1.pow(2) + (1 - t_BL1).pow(2)).sqrt()
        x_BLD = scale_BL1 * z_BLD + self.time_out(F.silu(self.time_in(time_features(t_BL, self.width).to(z_BLD.dtype))))
        if estimate_BLD is not None:
            noisy_BL1 = (t_BL < 1)[..., None].to(z_BLD.dtype)
            x_BLD = x_BLD + self.self_cond(estimate_BLD.to(z_BLD.dtype) * noisy_BL1)
        return x_BLD


def denoise_embeddings(model: Any, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None,
                       noise_level_BL: torch.Tensor, *, noise: torch.Tensor | None = None,
                       latent: torch.Tensor | None = None, estimate: torch.Tensor | None = None,
                       self_condition: torch.Tensor | None = None,
                       logits_span: tuple[int, int] | None = None) -> torch.Tensor:
    """``Denoiser.denoise_embeddings``: z_t from the model's own clean embeddings and ``noise``, or
    ``latent`` as given, the given positions clean either way; then the transformer on z_t, its
    noise level and the estimate (made first by the model itself for the ``self_condition`` rows)."""
    if not hasattr(model, "noise_in"):
        raise ValueError("noise_level is for embedding-diffusion models (model.noise: gaussian); this model masks")
    if (noise is None) == (latent is None):
        raise ValueError("pass exactly one of noise (training) and latent (sampling)")
    e_BLD = model.wte(input_ids_BL, "normalised")
    t_BL1 = noise_level_BL[..., None].to(e_BLD.dtype)
    if latent is not None:
        z_BLD = torch.where(t_BL1 >= 1, e_BLD, latent.to(e_BLD.dtype))
    else:
        z_BLD = t_BL1 * e_BLD + (1 - t_BL1) * noise.to(e_BLD.dtype)
    if self_condition is not None:
        # The estimate is an input, not a path for gradients (Plaid, CDCD): its pass runs without them.
        with torch.no_grad():
            first_BLV = model.run_inputs(model.noise_in(z_BLD, noise_level_BL, None), input_ids_BL, attention_mask_BL)
            keep_B11 = self_condition[:, None, None].to(e_BLD.dtype)
            estimate = model.wte(first_BLV.softmax(-1), "expected") * keep_B11
    return model.run_inputs(model.noise_in(z_BLD, noise_level_BL, estimate), input_ids_BL, attention_mask_BL,
                            logits_span)
