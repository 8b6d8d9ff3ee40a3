"""Adapting an autoregressive model into a diffusion model: the training-time attention schedules.

An adapted model starts from weights trained with causal attention; the recipe eases it into the
attention its kind samples with instead of switching at once:

- full attention (DiffuLLaMA's annealing): at step s each query sees every key before it, itself,
  and each key after it with probability r(s) = min(1, s / anneal_steps), drawn afresh every step
  and shared by the batch. Step 0 is the checkpoint's causal mask; from step ``anneal_steps`` on,
  every key is visible, which is the model's own full attention. (DiffuLLaMA's code takes
  (s + 1) / anneal_steps, counting the step being taken; here s counts the steps completed, so the
  first step trains the weights under the mask they were trained with.)
- block diffusion (LLaDA 2.0's block-size warm-up): blocks of 1 (a block of one position sees the
  clean positions before it: with the shift, the causal model itself), then 4, 16, ... up to the
  model's block size, each size for ``block_warmup_steps`` steps. The data pipeline draws one noise
  level per model block; a smaller training block shares its model block's level, which is still a
  draw of the forward process for that smaller block.

Every draw is a function of (seed, step), identical on every rank, so a resumed run repeats it.
``training_attention`` is what the trainer asks: the model call's extra arguments at a step.

Shape legend:  L sequence length (queries and keys).
"""

from __future__ import annotations

from typing import Any

import torch

from dlm_ray.config.schema import AdaptConfig, ModelConfig
from dlm_ray.core.kinds import kind_of

WARMUP_GROWTH = 4  # LLaDA 2.0 grows its blocks 1 -> 4 -> 32 -> ...; here by a constant factor of 4


def anneal_ratio(step: int, anneal_steps: int) -> float:
    """r(s): the chance that a key after the query is visible at step ``step`` (1: full attention)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return 1.0 if anneal_steps == 0 else min(1.0, step / anneal_steps)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a step's draws: a function of (seed, step), the same on every rank."""
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + step) % 2**63)


def annealed_visible(step: int, anneal_steps: int, length: int, *, seed: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """visible_LL [L, L] bool at ``step``: causal (a query sees itself and the keys before it) or a
    Bernoulli(r(step)) draw per (query, key), drawn on the CPU from ``step_generator``."""
    ratio = anneal_ratio(step, anneal_steps)
    causal_LL = torch.ones(length, length, dtype=torch.bool).tril()
    if ratio >= 1.0:
        return torch.ones(length, length, dtype=torch.bool, device=device)
    drawn_LL = torch.bernoulli(torch.full((length, length), ratio), generator=step_generator(seed, step)).bool()
    return (causal_LL | drawn_LL).to(device)


def warmup_block_sizes(block_size: int) -> list[int]:
    """The block sizes trained before ``block_size``: 1, 4, 16, ... below it and dividing it."""
    sizes, size = [], 1
    while size < block_size:
        if block_size % size == 0:
            sizes.append(size)
        size *= WARMUP_GROWTH
    return sizes


def block_size_at(step: int, block_size: int, block_warmup_steps: int) -> int:
    """The training block size at ``step``: each warm-up size for ``block_warmup_steps`` steps, then
    the model's own."""
    if block_warmup_steps == 0:
        return block_size
    stage = step // block_warmup_steps
    sizes = warmup_block_sizes(block_size)
    return sizes[stage] if stage < len(sizes) else block_size


def training_attention(model: ModelConfig, adapt: AdaptConfig, step: int, *, seq_len: int, seed: int,
                       device: torch.device | str = "cpu") -> dict[str, Any]:
    """The model call's extra arguments at ``step`` of a training run: ``visible_LL`` while a
    full-attention adaptation anneals, ``block_size`` while a block-diffusion one warms up, else
    nothing (the model's own attention)."""
    if not adapt.from_causal:
        return {}
    size = kind_of(model).block_size
    if size is None:
        if anneal_ratio(step, adapt.anneal_steps) >= 1.0:
            return {}
        return {"visible_LL": annealed_visible(step, adapt.anneal_steps, seq_len, seed=seed, device=device)}
    now = block_size_at(step, size, adapt.block_warmup_steps)
    return {} if now == size else {"block_size": now}
