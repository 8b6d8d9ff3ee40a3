"""The absorbing-state (masked) diffusion objective, as pure functions.

Forward process: each real token of x0 becomes ``mask_id`` independently with probability p(t).
Training loss: cross-entropy on the masked positions, weighted by 1/p(t), summed and divided by the
number of real tokens: the negative ELBO per token, an upper bound on the NLL.

The masking functions accept numpy arrays as well as torch tensors, so the Ray Data pipeline can
mask rows in its workers with the exact code the loss assumes.

Shape legend:  B batch, L sequence length, V vocab.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dlm_ray.config import DiffusionConfig

Array = np.ndarray | torch.Tensor
ModelFn = Callable[..., torch.Tensor]


# ------------------------------------------------------------------------------------- noise levels


def sample_times(num: int, cfg: DiffusionConfig, rng: np.random.Generator) -> np.ndarray:
    """t in [eps, 1] for ``num`` sequences; low-discrepancy spreads them evenly (MDLM)."""
    if cfg.time_sampling == "low_discrepancy":
        u = (rng.random() + np.arange(num)) / num % 1.0
    else:
        u = rng.random(num)
    return (1.0 - cfg.eps) * u + cfg.eps


def mask_probability(t: Array, cfg: DiffusionConfig) -> Array:
    """p(t): the chance a real token is masked at time t."""
    if cfg.schedule == "linear":
        return (1.0 - cfg.eps) * t + cfg.eps
    return (1.0 - cfg.eps) * t


def apply_mask(x0_BL: Array, p_B: Array, u_BL: Array, maskable_BL: Array, mask_id: int) -> tuple[Array, Array]:
    """Mask position (b, i) iff it is maskable and u[b, i] < p[b]. Returns (xt_BL, masked_BL).

    The uniforms ``u_BL`` come from the caller, so it owns the randomness (a seeded numpy Generator
    per row in the data pipeline, a torch Generator in tests). Works on numpy and torch alike.
    """
    masked_BL = (u_BL < p_B[:, None]) & maskable_BL
    if isinstance(x0_BL, torch.Tensor):
        return torch.where(masked_BL, torch.full_like(x0_BL, mask_id), x0_BL), masked_BL
    return np.where(masked_BL, mask_id, x0_BL).astype(x0_BL.dtype), masked_BL


def mask_batch(
    x0_BL: np.ndarray,
    real_BL: np.ndarray,
    cfg: DiffusionConfig,
    rng: np.random.Generator,
    *,
    mask_id: int,
    prompt_len_B: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One forward-diffusion draw for a numpy batch: t, p(t), masked ids and the mask.

    ``real_BL`` marks real tokens (padding is never masked). With ``prompt_len_B`` (the SFT variant)
    the first ``prompt_len`` tokens of each row are never masked either.
    """
    B, L = x0_BL.shape
    t_B = sample_times(B, cfg, rng)
    p_B = mask_probability(t_B, cfg)
    maskable_BL = real_BL.astype(bool)
    if prompt_len_B is not None:
        maskable_BL = maskable_BL & (np.arange(L)[None, :] >= np.asarray(prompt_len_B)[:, None])
    xt_BL, masked_BL = apply_mask(x0_BL, p_B, rng.random((B, L)), maskable_BL, mask_id)
    return {"t": t_B.astype(np.float32), "p_mask": p_B.astype(np.float32), "noisy_ids": xt_BL,
            "loss_mask": masked_BL}


# --------------------------------------------------------------------------------------------- loss


def exclude_mask_logit(logits_BLV: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The mask token is never a valid prediction: its logit becomes -inf (MDLM's SUBS)."""
    if mask_id >= logits_BLV.shape[-1]:
        return logits_BLV
    return logits_BLV.index_fill(-1, torch.tensor([mask_id], device=logits_BLV.device), float("-inf"))


def masked_token_nll(logits_BLV: torch.Tensor, x0_BL: torch.Tensor, masked_BL: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p(x0_i | xt) at masked positions, 0 elsewhere: [B, L] float32."""
    nll_BL = torch.zeros(x0_BL.shape, dtype=torch.float32, device=x0_BL.device)
    if masked_BL.any():
        logits_NV = exclude_mask_logit(logits_BLV[masked_BL].float(), mask_id)
        nll_BL[masked_BL] = F.cross_entropy(logits_NV, x0_BL[masked_BL], reduction="none")
    return nll_BL


def diffusion_loss(
    logits_BLV: torch.Tensor,
    x0_BL: torch.Tensor,
    masked_BL: torch.Tensor,
    p_mask_B: torch.Tensor,
    num_real_tokens: torch.Tensor | int,
    *,
    mask_id: int,
) -> torch.Tensor:
    """Σ_masked −log pθ(x0|xt) / p(t), over the number of real tokens: NELBO per token (scalar).

    ``num_real_tokens`` is passed in rather than counted here so that data-parallel workers can
    normalise by the global count and their gradients add up to the full-batch gradient.
    """
    nll_BL = masked_token_nll(logits_BLV, x0_BL, masked_BL.bool(), mask_id)
    weighted = (nll_BL / p_mask_B.float()[:, None]).sum()
    return weighted / num_real_tokens


# ---------------------------------------------------------------------------------- NELBO estimate


@torch.no_grad()
def estimate_nelbo(
    model: ModelFn,
    input_ids_BL: torch.Tensor,
    *,
    mask_id: int,
    num_samples: int,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Negative ELBO in nats per real token, per row: Tensor[B].

    The low-variance form: per sample draw a count l in 1..n (n = the row's real tokens), mask
    exactly l real positions uniformly without replacement and weight the masked cross-entropy by
    n / l. The counts are stratified across samples (evenly spaced with one random offset), so a
    few dozen samples give a stable figure. A model with uniform logits over the V - 1 predictable
    tokens (the mask excluded) scores exactly log(V - 1).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = input_ids_BL.device
    B, L = input_ids_BL.shape
    real_BL = torch.ones_like(input_ids_BL, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    n_B = real_BL.sum(-1)
    if (n_B == 0).any():
        raise ValueError("estimate_nelbo: a row has no real tokens")
    offset = torch.rand((), generator=generator, device=device)
    total_B = torch.zeros(B, dtype=torch.float64, device=device)
    for s in range(num_samples):
        frac = (s + offset) / num_samples  # stratified in [0, 1)
        l_B = (frac * n_B).long().clamp(max=n_B - 1) + 1  # in 1..n
        # Rank real positions by random scores; the l lowest are masked. Padding ranks last.
        scores_BL = torch.rand((B, L), generator=generator, device=device).masked_fill(~real_BL, 2.0)
        rank_BL = scores_BL.argsort(-1).argsort(-1)
        masked_BL = rank_BL < l_B[:, None]
        xt_BL = input_ids_BL.masked_fill(masked_BL, mask_id)
        logits_BLV = model(xt_BL, attention_mask)
        nll_BL = masked_token_nll(logits_BLV, input_ids_BL, masked_BL, mask_id)
        total_B += nll_BL.sum(-1).double() * n_B / l_B
    return (total_B / num_samples / n_B).float()


def nats_to_bits(nats: torch.Tensor | float) -> torch.Tensor | float:
    return nats / math.log(2)
