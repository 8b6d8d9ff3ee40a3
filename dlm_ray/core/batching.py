"""Many prompts of any lengths through ``sampling.generate``: padding, a seed per row, and rows
grouped by their settings, so a row's completion depends on its own prompt, settings and seed only.
With suffixes the completions are inserted between prompt and suffix (infilling)."""

from __future__ import annotations

from typing import Sequence

import torch

from dlm_ray.config.schema import SampleConfig
from dlm_ray.core.sampling import ModelFn, StepCallback, generate


def _pad(seqs: list[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    am = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            at = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, at] = torch.tensor(s)
            am[i, at] = 1
    return ids, am


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, P] and attention mask [B, P] (1 = real token): prompts."""
    return _pad(seqs, pad_id, left=True)


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, S] and mask [B, S] (1 = real token): suffixes, which start right after
    the generated positions."""
    return _pad(seqs, pad_id, left=False)


def generate_rows(
    model: ModelFn, prompts: list[list[int]], cfg: SampleConfig, *, seeds: list[int], pad_id: int, mask_id: int,
    eos_id: int, device: torch.device | str = "cpu", on_step: StepCallback | None = None, vocab_size: int | None = None,
    end_ids: Sequence[int] | None = None, suffixes: list[list[int]] | None = None,
) -> tuple[list[list[int]], int]:
    """``generate`` for a list of token-id prompts of any lengths, each row seeded on its own:
    the generated ids of each row (EOS not trimmed) and the number of model calls. With
    ``suffixes`` (one per row, any lengths, empty for none) the ids are inserted before them."""
    ids, am = left_pad(prompts, pad_id)
    stats: dict[str, int] = {}
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    fill: dict[str, torch.Tensor] = {}
    if suffixes is not None and any(suffixes):
        sids, smask = right_pad(suffixes, pad_id)
        fill = {"suffix_ids": sids.to(device), "suffix_mask": smask.to(device)}
    x = generate(model, ids.to(device), cfg, mask_id=mask_id, attention_mask=am.to(device), generator=gens,
                 eos_id=eos_id, on_step=on_step, stats=stats, vocab_size=vocab_size, end_ids=end_ids, **fill)
    P = ids.shape[1]
    return x[:, P:P + cfg.gen_length].tolist(), stats["model_calls"]


def generate_many(
    model: ModelFn, prompts: list[list[int]], samples: list[SampleConfig], *, seeds: list[int], batch_size: int,
    pad_id: int, mask_id: int, eos_id: int, device: torch.device | str = "cpu", vocab_size: int | None = None,
    end_ids: Sequence[int] | None = None, suffixes: list[list[int]] | None = None,
) -> list[tuple[list[int], int]]:
    """Rows with their own settings: rows with equal settings share ``generate_rows`` calls of at most
    ``batch_size``, sorted by length so little of each call is padding. Per row, in input order:
    (generated ids, model calls of the call that made them). Rows with a suffix (``suffixes``) are
    grouped apart from rows without, so a plain prompt never pays for another row's suffix."""
    out: list[tuple[list[int], int]] = [([], 0)] * len(prompts)
    groups: dict[str, list[int]] = {}
    for i, sc in enumerate(samples):
        groups.setdefault(sc.model_dump_json() + str(bool(suffixes and suffixes[i])), []).append(i)
    for rows in groups.values():
        rows.sort(key=lambda i: len(prompts[i]))
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            gen, calls = generate_rows(model, [prompts[i] for i in chunk], samples[chunk[0]],
                                       seeds=[seeds[i] for i in chunk], pad_id=pad_id, mask_id=mask_id,
                                       eos_id=eos_id, device=device, vocab_size=vocab_size, end_ids=end_ids,
                                       suffixes=None if suffixes is None else [suffixes[i] for i in chunk])
            for i, g in zip(chunk, gen):
                out[i] = (g, calls)
    return out


def trim_after_eos(ids: list[int], end_ids: int | Sequence[int]) -> list[int]:
    """The generated ids up to (not including) the first end token (EOS, or any of ``end_ids``)."""
    ends = {end_ids} if isinstance(end_ids, int) else set(end_ids)
    return next((ids[:i] for i, t in enumerate(ids) if t in ends), ids)
