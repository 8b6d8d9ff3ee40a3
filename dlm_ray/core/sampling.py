"""Sampling from any kind of model: the front door the batch job, Serve, evaluation and the tests
call, which asks the model's kind (``kinds``) what it can run and how.

``generate`` fills ``cfg.gen_length`` positions after each prompt: a diffusion model by iterative
unmasking (``denoise``; LLaDA's reference sampler at temperature 0 with low-confidence remasking,
or block by block for a block-causal model), the autoregressive baseline one token per call against
its KV cache. ``infill`` fills masks wherever they stand in a canvas, for a model that sees what
follows each position. Neither knows a tokenizer or a transport.

Shape legend:  B batch, P prompt length, S suffix length, T canvas length.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dlm_ray.config.schema import SampleConfig
from dlm_ray.core import denoise
from dlm_ray.core.denoise import Generators, ModelFn, StepCallback
from dlm_ray.core.kinds import kind_of_model

__all__ = ["Generators", "ModelFn", "StepCallback", "generate", "infill"]


def generate(
    model: ModelFn,
    prompt_ids_BP: torch.Tensor,
    cfg: SampleConfig,
    *,
    mask_id: int,
    attention_mask: torch.Tensor | None = None,
    generator: Generators = None,
    eos_id: int | None = None,
    max_length: int | None = None,
    on_step: StepCallback | None = None,
    stats: dict[str, int] | None = None,
    vocab_size: int | None = None,
    end_ids: Sequence[int] | None = None,
    suffix_ids: torch.Tensor | None = None,
    suffix_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LongTensor[B, P + gen_length] (``[B, P + gen_length + S]`` with a suffix: infilling), by the
    model's own kind. Settings the kind cannot run as given are refused by name (a request is
    adapted to a kind beforehand by ``kind.resolve``). The arguments are ``denoise.generate``'s."""
    return kind_of_model(model).generate(
        model, prompt_ids_BP, cfg, mask_id=mask_id, attention_mask=attention_mask, generator=generator,
        eos_id=eos_id, max_length=max_length, on_step=on_step, stats=stats, vocab_size=vocab_size,
        end_ids=end_ids, suffix_ids=suffix_ids, suffix_mask=suffix_mask)


def infill(model: ModelFn, canvas_BT: torch.Tensor, cfg: SampleConfig, *, mask_id: int,
           attention_mask: torch.Tensor | None = None, generator: Generators = None,
           stats: dict[str, int] | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Every mask of a canvas [B, T] filled (``denoise.infill``); the model must see ahead."""
    kind_of_model(model).check_infill()
    return denoise.infill(model, canvas_BT, cfg, mask_id=mask_id, attention_mask=attention_mask,
                          generator=generator, stats=stats, vocab_size=vocab_size)
