"""Text in, text out: the one path from prompts to completions.

    completions = complete_texts(model, tok, ["q1...32....23.3..="], cfg, seeds=[0])

Prompts become ids in ``dlm_ray.core.text`` (``encode_prompt``, ``encode_chat``). ``complete_ids``
runs ``sampling.generate_many`` (rows grouped by settings and length, a seed per row, proposals
limited to the tokenizer's vocabulary) and cuts each completion at its first EOS. Evaluation, batch
generation, Serve and the benchmarks all go through here, so a prompt is completed the same way
everywhere. No Ray, no transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dlm_ray.config.schema import ModelConfig, SampleConfig
from dlm_ray.core.batching import generate_many, trim_after_eos
from dlm_ray.core.sampling import ModelFn
from dlm_ray.core.text import Tok, encode_prompt


@dataclass
class Completion:
    text: str
    ids: list[int]  # up to (not including) the first EOS
    num_generated: int  # positions the sampler filled, EOS padding included
    num_model_calls: int  # of the generate() call that made it (one call serves its whole batch)

    @property
    def finished(self) -> bool:
        """The model ended the answer (an EOS) before the generation length ran out."""
        return len(self.ids) < self.num_generated


def finish(tok: Tok, generated: list[int], num_model_calls: int) -> Completion:
    """The generated ids of one row (EOS padding included) as a completion: cut at the first EOS,
    decoded."""
    ids = trim_after_eos(generated, tok.end_ids)
    return Completion(tok.decode(ids), ids, len(generated), num_model_calls)


def complete_ids(model: ModelFn, tok: Tok, prompt_ids: Sequence[list[int]], samples: SampleConfig | Sequence[SampleConfig],
                 seeds: Sequence[int], *, batch_size: int = 64, device: torch.device | str = "cpu",
                 suffixes: Sequence[list[int]] | None = None) -> list[Completion]:
    """One completion per prompt (ids from ``encode_prompt``), with its own settings and seed; with
    ``suffixes`` (ids, empty for none) each is inserted before its row's suffix."""
    if len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
    per_row = [samples] * len(prompt_ids) if isinstance(samples, SampleConfig) else list(samples)
    results = generate_many(model, list(prompt_ids), per_row, seeds=list(seeds), batch_size=batch_size,
                            pad_id=tok.pad_id, mask_id=tok.mask_id, eos_id=tok.eos_id, device=device,
                            vocab_size=tok.vocab_size, end_ids=tok.end_ids,
                            suffixes=None if suffixes is None else list(suffixes))
    return [finish(tok, gen, calls) for gen, calls in results]


def complete_texts(model: ModelFn, tok: Tok, prompts: Sequence[str], cfg: SampleConfig | Sequence[SampleConfig],
                   seeds: Sequence[int], *, batch_size: int = 64, device: torch.device | str = "cpu",
                   prepend_eos: bool = True) -> list[Completion]:
    """Text → ids → ``generate`` → text, a seed per prompt: a completion does not depend on the
    other prompts it is batched with."""
    ids = [encode_prompt(tok, p, prepend_eos=prepend_eos) for p in prompts]
    return complete_ids(model, tok, ids, cfg, seeds, batch_size=batch_size, device=device)
