"""The autoregressive baseline (``model.attention: causal``): next-token loss, exact likelihood and
token-by-token sampling with a KV cache, as pure functions of a causal ``Denoiser``.

It shares everything else with the diffusion objectives (data pipeline, training job, checkpoints,
export, ``sampling.generate``, batch generation, Serve), so a comparison between them differs in
the objective alone. Its kind (``kinds.Autoregressive``) hands ``sampling.generate`` to
``generate_ar`` and ``likelihood.estimate_nelbo`` to ``nll_per_token``: for this model the bound
is the exact negative log-likelihood.

Shape legend:  B batch, L sequence length, V vocab, P prompt length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dlm_ray.config.schema import SampleConfig
from dlm_ray.core.denoise import propose
from dlm_ray.core.diffusion import exclude_mask_logit


def target_mask(attention_mask_BL: torch.Tensor | None, maskable_BL: torch.Tensor | None, shape: torch.Size,
                device: torch.device) -> torch.Tensor:
    """Bool [B, L-1]: which next tokens are scored. Token i+1 counts when it is real (and maskable:
    the answer of a fine-tuning row) and token i, its context's last, is real too."""
    real_BL = torch.ones(shape, dtype=torch.bool, device=device) if attention_mask_BL is None \
        else attention_mask_BL.bool()
    want_BL = real_BL if maskable_BL is None else real_BL & maskable_BL.bool()
    return real_BL[:, :-1] & want_BL[:, 1:]


def next_token_nll(logits_BLV: torch.Tensor, input_ids_BL: torch.Tensor, targets_BL1: torch.Tensor,
                   mask_id: int) -> torch.Tensor:
    """-log p(x_{i+1} | x_<=i) where ``targets_BL1`` is set, 0 elsewhere: [B, L-1] float32. The mask
    token is never a prediction here either (an autoregressive model never meets it)."""
    nll_BL1 = torch.zeros(targets_BL1.shape, dtype=torch.float32, device=input_ids_BL.device)
    if targets_BL1.any():
        logits_NV = exclude_mask_logit(logits_BLV[:, :-1][targets_BL1].float(), mask_id)
        nll_BL1[targets_BL1] = F.cross_entropy(logits_NV, input_ids_BL[:, 1:][targets_BL1], reduction="none")
    return nll_BL1


def next_token_loss(logits_BLV: torch.Tensor, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None,
                    num_targets: torch.Tensor | int, *, mask_id: int, maskable_BL: torch.Tensor | None = None,
                    row_weight_B: torch.Tensor | None = None) -> torch.Tensor:
    """Σ −log p(next token) over the scored positions, divided by ``num_targets`` (scalar).

    As in ``diffusion_loss`` the count is passed in, so data-parallel workers can normalise by the
    global count; the fine-tuning form scores the answer only and weights each row (``row_weight_B``)."""
    targets = target_mask(attention_mask_BL, maskable_BL, input_ids_BL.shape, input_ids_BL.device)
    per_row_B = next_token_nll(logits_BLV, input_ids_BL, targets, mask_id).sum(-1)
    if row_weight_B is not None:
        per_row_B = per_row_B * row_weight_B.float()
    return per_row_B.sum() / num_targets


@torch.no_grad()
def nll_per_token(model: Any, input_ids_BL: torch.Tensor, *, mask_id: int,
                  attention_mask: torch.Tensor | None = None, maskable: torch.Tensor | None = None) -> torch.Tensor:
    """Exact negative log-likelihood in nats per scored token, per row: Tensor[B]. One forward.

    Every real (and maskable) token after the row's first real one is scored: the first has no
    context in a row cut from a packed stream. With ``maskable`` (an answer after its prompt) this
    is -log p(answer | prompt) per answer token."""
    targets = target_mask(attention_mask, maskable, input_ids_BL.shape, input_ids_BL.device)
    n_B = targets.sum(-1)
    if (n_B == 0).any():
        raise ValueError("nll_per_token: a row has no token to score (it needs a real token before one)")
    logits_BLV = model(input_ids_BL, attention_mask)
    return next_token_nll(logits_BLV, input_ids_BL, targets, mask_id).sum(-1) / n_B


def check_settings(cfg: SampleConfig) -> None:
    """Settings that mean nothing for a model that writes one token per call, refused by name."""
    if cfg.cfg_scale:
        raise ValueError("cfg_scale is for diffusion models; an autoregressive model samples without guidance")
    if cfg.cache != "none":
        raise ValueError(f"cache={cfg.cache!r} is for diffusion models; an autoregressive model always keeps "
                         "its exact KV cache")
    if cfg.threshold is not None or cfg.factor is not None or cfg.entropy_bound is not None:
        raise ValueError("threshold, factor and entropy_bound choose how many tokens a diffusion step commits; an "
                         "autoregressive model commits one per call")
    if cfg.sub_block_length is not None:
        raise ValueError("sub_block_length splits a diffusion block; an autoregressive model writes one token per call")


@torch.inference_mode()
def generate_ar(model: Any, prompt_ids_BP: torch.Tensor, cfg: SampleConfig, *, mask_id: int,
                attention_mask: torch.Tensor | None, generator: Any, ends: torch.Tensor, eos_id: int | None,
                vocab_size: int | None, on_step: Any = None, stats: dict[str, int] | None = None) -> torch.Tensor:
    """``cfg.gen_length`` tokens after each (left-padded) prompt, one per model call: greedy at
    temperature 0, else a draw from softmax(logits / T) (Gumbel-max, per-row generators as in
    diffusion sampling). The prompt is run once; each later call feeds the last token against the
    cache, allocated once for the whole canvas and written in place (a token costs its own keys and
    values, never a copy of the cache's). ``stop_at_eos`` ends a row at its first end token (the
    rest become EOS); the batch stops when every row has. Returns LongTensor[B, P + gen_length],
    like ``sampling.generate``."""
    check_settings(cfg)
    B, P = prompt_ids_BP.shape
    device = prompt_ids_BP.device
    if P == 0:
        raise ValueError("an autoregressive model needs a prompt of at least one token")
    x_BT = torch.cat([prompt_ids_BP, torch.full((B, cfg.gen_length), mask_id, dtype=torch.long, device=device)], 1)
    am = None if attention_mask is None or bool(attention_mask.bool().all()) else attention_mask.long()
    logits_BV, cache = model.prefill(prompt_ids_BP, am, logits_span=(P - 1, P), capacity=P + cfg.gen_length)
    eos_1 = None if eos_id is None else torch.tensor([eos_id], device=device)  # made once, not per token
    calls, done_B = 1, torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(cfg.gen_length):
        logits_BV = logits_BV[:, -1:]
        if vocab_size is not None:
            logits_BV = logits_BV[..., :vocab_size]
        logits_BV = exclude_mask_logit(logits_BV, mask_id)
        if cfg.logits_eos_inf and eos_id is not None:
            logits_BV = logits_BV.index_fill(-1, eos_1, float("-inf"))
        next_B = propose(logits_BV, cfg.temperature, generator)[:, 0]
        if eos_id is not None:  # a finished (or stopped) row writes EOS from here on
            next_B = torch.where(done_B, torch.full_like(next_B, eos_id), next_B)
        if cfg.stop_at_eos:
            done_B = done_B | torch.isin(next_B, ends)
        x_BT[:, P + i] = next_B
        if on_step is not None:
            stop_B = on_step(i, x_BT)
            if stop_B is not None and bool(stop_B.any()):
                if eos_id is None:
                    raise ValueError("stopping rows from on_step needs eos_id")
                x_BT[stop_B, P + i + 1:] = eos_id
                done_B = done_B | stop_B
        if i + 1 == cfg.gen_length or (done_B.all() and (cfg.stop_at_eos or on_step is not None)):
            break
        logits_BV, cache = model.forward_block(next_B[:, None], cache, extend=True)
        calls += 1
    rest = x_BT[:, P:]
    if eos_id is not None:
        x_BT[:, P:] = rest.masked_fill(rest == mask_id, eos_id)  # rows that stopped early
    if stats is not None:
        stats["model_calls"] = calls
    return x_BT

