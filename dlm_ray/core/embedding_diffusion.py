"""Embedding diffusion (``model.noise: gaussian``): Gaussian noise on the token embeddings, a
denoiser that predicts the clean tokens, and an ODE that turns noise into text.

- **Forward process** (the flow-matching line of LangFlow and FLM): z_t = t·e + (1 − t)·ε with e
  the normalised embedding of the clean token (``embedding_input``), ε ~ N(0, I), t in [0, 1]:
  t = 0 is pure noise, t = 1 clean. Given positions (a prompt, an SFT row's prompt, padding) stay
  clean: their level is 1. Levels are drawn as t = shift(u) = u / (u + s(1 − u)) with u spread
  evenly over the batch (one level per row, low-discrepancy), s the model's ``time_shift``.
- **Training**: cross-entropy of the clean tokens at the noised positions (x0-prediction, as CDCD
  trains it; the embeddings cannot collapse, since the loss must tell tokens apart through them).
  Half of the rows are self-conditioned: the model first makes its estimate ê = softmax(logits)·Ē
  (score interpolation) without one, and then reads it (Plaid, CDCD).
- **Likelihood**: VDM's continuous-time bound, which Plaid reports, for this path (α = t, σ = 1 − t,
  log-SNR λ = 2·logit(t)): −log p(x) ≤ ½∫ e^λ ‖e − ê(z_λ)‖² dλ over λ ≤ λ_max (summed over the
  noised positions), plus −log p(x | z_λmax) from the model's own logits. At t = 0 the path is
  the prior N(0, I) itself, so there is no prior term; the levels below λ_min, not sampled, are
  bounded by ½ e^λmin · 4D per position (‖e − ê‖ ≤ 2√D). λ is drawn stratified and uniform in
  [λ_min, λ_max]. The figure is an upper bound on the NLL, like masked diffusion's NELBO.
- **Sampling**: ``steps`` Euler steps of the probability-flow ODE dz/dt = (ê − z) / (1 − t) from
  Gaussian noise at t = 0 to t = 1, at the shifted levels training drew (for this path an Euler
  step is DDIM's step), each call self-conditioned on the previous call's ê; the tokens are the
  argmax of the last call's logits (a draw from softmax(logits / T) at temperature T > 0).

Shape legend:  B batch, L sequence length, D d_model, V vocab, P prompt length, G gen_length,
T canvas length (P + G).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dlm_ray.config.schema import SampleConfig
from dlm_ray.core.denoise import Generators, normal, propose
from dlm_ray.core.diffusion import exclude_mask_logit

SELF_CONDITION_RATE = 0.5  # the share of training rows that read the model's own first estimate
# The log-SNR range the bound samples: below LAMBDA_MIN the remainder is bounded (≈ 0.002 nats per
# token at D = 128); at LAMBDA_MAX (t ≈ 0.95) the tokens are plain to a trained model and the
# decoder term takes over. Higher would only weigh the last 1e-4 of softmax mass by e^λ.
LAMBDA_MIN, LAMBDA_MAX = -12.0, 6.0


def shift(u: torch.Tensor, s: float) -> torch.Tensor:
    """t = u / (u + s(1 − u)): uniform u mapped to noise levels, spending more of them near t = 0
    (pure noise) for s > 1."""
    return u / (u + s * (1 - u))


def noised_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool [B, L]: the positions a training row noises. Real tokens, less a conditional document's
    prompt (``given``, from the pipeline) and a fine-tuning row's (``prompt_len``): a prompt is
    given, as in sampling."""
    noised_BL = batch["attention_mask"].bool()
    if "given" in batch:
        noised_BL = noised_BL & ~batch["given"].bool()
    if "prompt_len" in batch:
        L = noised_BL.shape[1]
        noised_BL = noised_BL & (torch.arange(L, device=noised_BL.device)[None, :] >= batch["prompt_len"][:, None])
    return noised_BL


def training_inputs(noised_BL: torch.Tensor, *, d_model: int, time_shift: float,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The noise of one training step: ``noise_level`` [B, L] (the row's level where noised, 1
    elsewhere), ``noise`` [B, L, D] and ``self_condition`` [B] (bool): the model call's arguments."""
    B, L = noised_BL.shape
    device = noised_BL.device
    u_B = (torch.rand((), generator=generator, device=device) + torch.arange(B, device=device)) / B
    t_BL = torch.where(noised_BL, shift(u_B[torch.randperm(B, generator=generator, device=device)], time_shift)[:, None],
                       torch.ones((), device=device))
    return {"noise_level": t_BL, "noise": torch.randn(B, L, d_model, generator=generator, device=device),
            "self_condition": torch.rand(B, generator=generator, device=device) < SELF_CONDITION_RATE}


def token_loss(logits_BLV: torch.Tensor, x0_BL: torch.Tensor, noised_BL: torch.Tensor, denominator: Any, *,
               mask_id: int, row_weight_B: torch.Tensor | None = None) -> torch.Tensor:
    """Σ −log p(x0_i | z_t) over the noised positions, divided by ``denominator`` (the mask token is
    never a prediction); ``row_weight_B`` weights each row (fine-tuning)."""
    nll_BL = torch.zeros(x0_BL.shape, dtype=torch.float32, device=x0_BL.device)
    if noised_BL.any():
        logits_NV = exclude_mask_logit(logits_BLV[noised_BL].float(), mask_id)
        nll_BL[noised_BL] = F.cross_entropy(logits_NV, x0_BL[noised_BL], reduction="none")
    per_row_B = nll_BL.sum(-1)
    if row_weight_B is not None:
        per_row_B = per_row_B * row_weight_B.float()
    return per_row_B.sum() / denominator


# --------------------------------------------------------------------------------------- likelihood


@torch.no_grad()
def gaussian_nelbo(model: Any, input_ids_BL: torch.Tensor, *, mask_id: int, num_samples: int,
                   attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   maskable: torch.Tensor | None = None) -> torch.Tensor:
    """The bound above in nats per scored token, per row [B]; the scored positions (real, and
    ``maskable`` where given) are noised, every other position is given."""
    B, L = input_ids_BL.shape
    device = input_ids_BL.device
    scored_BL = torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    if maskable is not None:
        scored_BL = scored_BL & maskable.bool()
    n_B = scored_BL.sum(-1)
    if (n_B == 0).any():
        raise ValueError("estimate_nelbo: a row has no token to score")
    D = model.config.d_model
    e_BLD = model.wte(input_ids_BL, "normalised").float()
    one = torch.ones((), device=device)

    def call(t_B: torch.Tensor) -> torch.Tensor:
        t_BL = torch.where(scored_BL, t_B[:, None], one)
        noise = torch.randn(B, L, D, generator=generator, device=device)
        return model(input_ids_BL, attention_mask, noise_level=t_BL, noise=noise)

    width = LAMBDA_MAX - LAMBDA_MIN
    diffusion_B = torch.zeros(B, dtype=torch.float64, device=device)
    for k in range(num_samples):  # stratified: sample k's λ in the k-th of num_samples equal slices
        lam_B = LAMBDA_MIN + width * (k + torch.rand(B, generator=generator, device=device)) / num_samples
        estimate_BLD = model.wte(call(torch.sigmoid(lam_B / 2)).softmax(-1), "expected").float()
        err_B = ((estimate_BLD - e_BLD).pow(2).sum(-1) * scored_BL).sum(-1)
        diffusion_B += (width * 0.5 * lam_B.exp() * err_B).double()
    diffusion_B = diffusion_B / num_samples + 0.5 * math.exp(LAMBDA_MIN) * 4 * D * n_B.double()
    logits_BLV = exclude_mask_logit(call(torch.full((B,), 1 / (1 + math.exp(-LAMBDA_MAX / 2)), device=device)), mask_id)
    nll_BL = torch.zeros(B, L, dtype=torch.float64, device=device)
    nll_BL[scored_BL] = F.cross_entropy(logits_BLV[scored_BL].float(), input_ids_BL[scored_BL],
                                        reduction="none").double()
    return ((diffusion_B + nll_BL.sum(-1)) / n_B).float()


# ----------------------------------------------------------------------------------------- sampling


def check_settings(cfg: SampleConfig) -> None:
    """Settings of the unmasking samplers, which mean nothing to an ODE over embeddings, refused by
    name."""
    wrong = [name for name, on in [("cfg_scale", cfg.cfg_scale), ("threshold", cfg.threshold is not None),
                                   ("factor", cfg.factor is not None), ("entropy_bound", cfg.entropy_bound is not None),
                                   ("sub_block_length", cfg.sub_block_length is not None),
                                   ("remasking='random'", cfg.remasking != "low_confidence"),
                                   (f"cache={cfg.cache!r}", cfg.cache != "none"),
                                   ("logits_eos_inf", cfg.logits_eos_inf),
                                   ("confidence_eos_eot_inf", cfg.confidence_eos_eot_inf)] if on]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: an embedding-diffusion model commits no tokens step by step; it "
                         "integrates an ODE over its whole answer for `steps` calls (set steps and temperature only)")
    if cfg.block_length != cfg.gen_length:
        raise ValueError(f"an embedding-diffusion model denoises its whole answer at once: block_length must equal "
                         f"gen_length ({cfg.gen_length}), got {cfg.block_length}")


@torch.inference_mode()
def generate_embedding(model: Any, prompt_ids_BP: torch.Tensor, cfg: SampleConfig, *, mask_id: int,
                       attention_mask: torch.Tensor | None, generator: Generators, ends: torch.Tensor,
                       eos_id: int | None, vocab_size: int | None, on_step: Any = None,
                       stats: dict[str, int] | None = None) -> torch.Tensor:
    """``cfg.gen_length`` tokens after each (left-padded) prompt by ``cfg.steps`` Euler steps of the
    ODE, every call over the whole canvas with the prompt's embeddings clean: LongTensor[B, T], like
    ``sampling.generate``. Each row's starting noise comes from its own generator, and nothing after
    it is random at temperature 0, so a row's answer does not depend on its batch. ``on_step`` sees
    the canvas after every call, masks where the answer is not yet decided (the last call's canvas
    holds the answer); rows it stops leave the following calls, their answers EOS. ``stop_at_eos``
    makes everything after a row's first end token EOS."""
    check_settings(cfg)
    B, P = prompt_ids_BP.shape
    G, T, device = cfg.gen_length, P + cfg.gen_length, prompt_ids_BP.device
    D = model.config.d_model
    x_BT = torch.cat([prompt_ids_BP, torch.full((B, G), mask_id, dtype=torch.long, device=device)], 1)
    am_BT = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        am_BT = torch.cat([attention_mask.long(), torch.ones(B, G, dtype=torch.long, device=device)], 1)
    answer_T = torch.arange(T, device=device) >= P
    z_BGD = normal((B, G, D), generator, device)
    levels = shift(torch.arange(cfg.steps + 1, device=device, dtype=torch.float64) / cfg.steps,
                   model.config.gaussian_time_shift).tolist()
    rows = torch.arange(B, device=device)  # the rows still in the calls
    estimate_BGD: torch.Tensor | None = None
    for k in range(cfg.steps):
        t, t_next = levels[k], levels[k + 1]
        n = len(rows)
        latent_BTD = torch.zeros(n, T, D, device=device, dtype=z_BGD.dtype)
        latent_BTD[:, P:] = z_BGD
        est_BTD = None
        if estimate_BGD is not None:
            est_BTD = torch.zeros_like(latent_BTD)
            est_BTD[:, P:] = estimate_BGD
        t_BT = torch.where(answer_T, torch.tensor(t, device=device), torch.ones((), device=device)).expand(n, T)
        logits_BGV = model(x_BT[rows], None if am_BT is None else am_BT[rows], noise_level=t_BT, latent=latent_BTD,
                           estimate=est_BTD, logits_span=(P, T))
        estimate_BGD = model.wte(logits_BGV.softmax(-1), "expected").to(z_BGD.dtype)
        # Euler: z + (t' − t)·(ê − z)/(1 − t); at the last level (t' = 1) z becomes ê itself.
        z_BGD = z_BGD + (t_next - t) / (1 - t) * (estimate_BGD - z_BGD)
        if k + 1 == cfg.steps:
            if vocab_size is not None:
                logits_BGV = logits_BGV[..., :vocab_size]
            x_BT[rows, P:] = propose(exclude_mask_logit(logits_BGV, mask_id), cfg.temperature,
                                     _rows(generator, rows))
        if on_step is not None:
            stop_B = on_step(k, x_BT)
            if stop_B is not None and bool(stop_B[rows].any()):
                if eos_id is None:
                    raise ValueError("stopping rows from on_step needs eos_id")
                stopped = rows[stop_B[rows]]
                x_BT[stopped, P:] = eos_id
                keep = ~stop_B[rows]
                rows, z_BGD, estimate_BGD = rows[keep], z_BGD[keep], estimate_BGD[keep]
                if not len(rows):
                    break
    if stats is not None:
        stats["model_calls"] = k + 1
    if cfg.stop_at_eos and eos_id is not None and ends.numel():
        after_BG = torch.isin(x_BT[:, P:], ends).long().cumsum(-1) > 0
        after_BG[:, 1:] = after_BG[:, :-1].clone()  # the first end token itself stays
        after_BG[:, 0] = False
        x_BT[:, P:] = x_BT[:, P:].masked_fill(after_BG, eos_id)
    return x_BT


def _rows(generator: Generators, rows: torch.Tensor) -> Generators:
    """The generators of the rows still in the calls (one shared generator stays shared)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [generator[i] for i in rows.tolist()]
