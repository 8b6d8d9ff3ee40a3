"""The likelihood of any kind of model, as one call: the negative ELBO (an upper bound on the
negative log-likelihood) for diffusion models, the exact NLL for the autoregressive baseline.

The bounds themselves are ``diffusion.masked_nelbo`` (full attention: stratified counts of masked
tokens, weighted n / l), ``diffusion.block_nelbo`` (block diffusion: each block given the clean
blocks before it) and ``autoregressive.nll_per_token``; the model's kind chooses.
"""

from __future__ import annotations

from typing import Iterable

import torch

from dlm_ray.core.denoise import ModelFn
from dlm_ray.core.kinds import kind_of_model


def estimate_nelbo(model: ModelFn, input_ids_BL: torch.Tensor, *, mask_id: int, num_samples: int,
                   attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   maskable: torch.Tensor | None = None) -> torch.Tensor:
    """Nats per real token, per row: Tensor[B]. With ``maskable`` [B, L] (an answer after its
    prompt) only those positions are scored: the bound on -log p(answer | prompt) per answer token.
    A model with uniform logits over the V - 1 predictable tokens scores exactly log(V - 1)."""
    return kind_of_model(model).nelbo(model, input_ids_BL, mask_id=mask_id, num_samples=num_samples,
                                      attention_mask=attention_mask, generator=generator, maskable=maskable)


@torch.no_grad()
def nelbo_totals(model: ModelFn, batches: Iterable[dict[str, torch.Tensor]], *, mask_id: int, num_samples: int,
                 max_batches: int, seed: int, device: torch.device) -> torch.Tensor:
    """[summed NELBO in nats, tokens scored] over up to ``max_batches`` held-out batches (rows of
    ``input_ids`` and ``attention_mask``; a fine-tuning row's ``prompt_len`` leaves its prompt out):
    what the training loop and a checkpoint's evaluation divide, after summing over ranks if any."""
    total, count = torch.zeros(2, dtype=torch.float64, device=device), 0
    gen = torch.Generator(device=device).manual_seed(seed)
    for batch in batches:
        b = {k: v.to(device) for k, v in batch.items()}
        real = b["attention_mask"].bool()
        if "prompt_len" in b:
            real = real & (torch.arange(real.shape[1], device=device)[None, :] >= b["prompt_len"][:, None])
        nelbo = estimate_nelbo(model, b["input_ids"].long(), mask_id=mask_id, num_samples=num_samples,
                               attention_mask=b["attention_mask"].long(), generator=gen, maskable=real)
        total += torch.stack([(nelbo.double() * real.sum(-1)).sum(), real.sum().double()])
        count += 1
        if count >= max_batches:
            break
    return total
