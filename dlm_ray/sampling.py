"""Samplers: iterative unmasking of a canvas of masks after the prompt.

One ``generate`` serves the tests, the batch job and Serve; it knows no tokenizer and no transport.
With ``temperature=0`` and ``remasking="low_confidence"`` it is LLaDA's reference algorithm:

- the canvas is the (left-padded) prompt followed by ``gen_length`` masks, split into blocks of
  ``block_length`` that are finished one after another (semi-autoregressive);
- each block gets ``steps / num_blocks`` steps; with m masks and k steps, step i commits
  ⌊m/k⌋ tokens, plus one for the first m mod k steps;
- each step calls the model on the whole canvas, proposes x̂ = argmax(logits/T + Gumbel) (float64),
  scores each masked position of the current block by softmax(logits)[x̂] (or a uniform draw for
  ``random``) and commits the top-n.

One deliberate difference from the reference code: the mask token is never proposed (its logit is
-inf), so a weak or untrained model can never "commit" a mask and leave the canvas unfinished.

Shape legend:  B batch, P prompt length, T canvas length (P + gen_length), V vocab.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from dlm_ray.config import SampleConfig
from dlm_ray.diffusion import exclude_mask_logit

ModelFn = Callable[..., torch.Tensor]
# One generator for the batch, or one per row: per-row generators make each row's output independent
# of which other rows share its batch (the batch job seeds every row on its own).
Generators = torch.Generator | Sequence[torch.Generator] | None
# Called after every step with (step index, canvas): lets Serve stream partial text.
StepCallback = Callable[[int, torch.Tensor], None]


def num_transfer_tokens(num_masked_B: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step [B, steps]: as even as possible, earlier steps take the remainder."""
    base_B1 = (num_masked_B // steps)[:, None]
    rem_B1 = (num_masked_B % steps)[:, None]
    step_idx = torch.arange(steps, device=num_masked_B.device)[None, :]
    return base_B1 + (step_idx < rem_B1).long()


def uniform(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Float64 U(0, 1) draws of ``shape`` (batch first); with a list, row b comes from generator b."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = device if generator is None else generator.device
        return torch.rand(shape, dtype=torch.float64, generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.rand(shape[1:], dtype=torch.float64, generator=g, device=g.device)
                        for g in generator]).to(device)


def propose(logits_BTV: torch.Tensor, temperature: float, generator: Generators) -> torch.Tensor:
    """x̂ = argmax(logits / T + Gumbel noise), in float64: low precision flattens the noise."""
    if temperature == 0:
        return logits_BTV.argmax(-1)
    u = uniform(tuple(logits_BTV.shape), generator, logits_BTV.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits_BTV.double() / temperature + gumbel).argmax(-1)


def _validate(
    prompt_ids_BP: torch.Tensor, cfg: SampleConfig, mask_id: int, attention_mask: torch.Tensor | None,
    max_length: int | None,
) -> None:
    if prompt_ids_BP.dim() != 2:
        raise ValueError(f"prompt_ids must be [batch, prompt_len], got shape {tuple(prompt_ids_BP.shape)}")
    if cfg.gen_length % cfg.block_length:
        raise ValueError(f"gen_length={cfg.gen_length} is not divisible by block_length={cfg.block_length}")
    if cfg.steps % cfg.num_blocks:
        raise ValueError(f"steps={cfg.steps} is not divisible by the number of blocks ({cfg.num_blocks})")
    total = prompt_ids_BP.shape[1] + cfg.gen_length
    if max_length is not None and total > max_length:
        raise ValueError(
            f"prompt length {prompt_ids_BP.shape[1]} + gen_length {cfg.gen_length} = {total} exceeds "
            f"the model's context of {max_length}"
        )
    if attention_mask is not None:
        if attention_mask.shape != prompt_ids_BP.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != prompt shape {tuple(prompt_ids_BP.shape)}"
            )
        pad = ~attention_mask.bool()
        if (prompt_ids_BP[pad] == mask_id).any():
            raise ValueError("the pad id equals mask_id: padding would be taken for positions to fill")
        real = attention_mask.bool()
        # Left padding: once a row's real tokens start, they must run to the end of the prompt.
        if (real[:, :-1] & ~real[:, 1:]).any():
            raise ValueError("prompts must be left-padded (attention_mask 0s before 1s in each row)")
    else:
        real = torch.ones_like(prompt_ids_BP, dtype=torch.bool)
    if (prompt_ids_BP[real] == mask_id).any():
        raise ValueError("a prompt contains mask_id; generate fills only the positions after the prompt")


def _logits(
    model: ModelFn, x_BT: torch.Tensor, am_BT: torch.Tensor | None, prompt_real_BT: torch.Tensor,
    cfg_scale: float, mask_id: int,
) -> torch.Tensor:
    if cfg_scale == 0:
        return model(x_BT, am_BT)
    # Unsupervised classifier-free guidance: the unconditional pass sees the prompt fully masked.
    un_x_BT = x_BT.masked_fill(prompt_real_BT, mask_id)
    am2 = None if am_BT is None else torch.cat([am_BT, am_BT])
    both = model(torch.cat([x_BT, un_x_BT]), am2)
    cond, uncond = both.chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


@torch.no_grad()
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
) -> torch.Tensor:
    """Fill ``cfg.gen_length`` positions after each prompt: LongTensor[B, P + gen_length].

    ``max_length`` defaults to the model's ``max_seq_len`` when it has one. ``eos_id`` is needed only
    for ``cfg.stop_at_eos``. Random draws cover the generated positions only, so with one generator
    per row a row's output does not depend on the prompt lengths of the rows batched with it.
    """
    if max_length is None:
        max_length = getattr(model, "max_seq_len", None)
    _validate(prompt_ids_BP, cfg, mask_id, attention_mask, max_length)
    if cfg.stop_at_eos and eos_id is None:
        raise ValueError("stop_at_eos needs eos_id")
    B, P = prompt_ids_BP.shape
    device = prompt_ids_BP.device
    x_BT = torch.cat([prompt_ids_BP, torch.full((B, cfg.gen_length), mask_id, dtype=torch.long, device=device)], 1)
    am_BT = None
    prompt_real_BT = torch.zeros_like(x_BT, dtype=torch.bool)
    if attention_mask is not None:
        am_BT = torch.cat([attention_mask.long(), torch.ones((B, cfg.gen_length), dtype=torch.long, device=device)], 1)
        prompt_real_BT[:, :P] = attention_mask.bool()
    else:
        prompt_real_BT[:, :P] = True

    steps_per_block = cfg.steps // cfg.num_blocks
    step = 0
    for blk in range(cfg.num_blocks):
        start, end = P + blk * cfg.block_length, P + (blk + 1) * cfg.block_length
        counts_BS = num_transfer_tokens((x_BT[:, start:end] == mask_id).sum(-1), steps_per_block)
        for i in range(steps_per_block):
            # Only the generated region [P, T) ever changes: proposals and scores are computed there.
            gen_BG = x_BT[:, P:]
            logits_BGV = exclude_mask_logit(
                _logits(model, x_BT, am_BT, prompt_real_BT, cfg.cfg_scale, mask_id)[:, P:], mask_id)
            x0_BG = propose(logits_BGV, cfg.temperature, generator)
            if cfg.remasking == "low_confidence":
                conf_BG = logits_BGV.softmax(-1).gather(-1, x0_BG[..., None]).squeeze(-1).double()
            else:
                conf_BG = uniform(tuple(gen_BG.shape), generator, device)
            # Only masked positions of the current block compete.
            conf_BG[:, end - P:] = float("-inf")
            conf_BG = conf_BG.masked_fill(gen_BG != mask_id, float("-inf"))
            commit_BG = _top_n(conf_BG, counts_BS[:, i])
            x_BT[:, P:] = torch.where(commit_BG, x0_BG, gen_BG)
            if on_step is not None:
                on_step(step, x_BT)
            step += 1
        if cfg.stop_at_eos and _all_finished(x_BT, P, end, eos_id, mask_id):  # type: ignore[arg-type]
            x_BT[:, end:] = eos_id
            break
    return x_BT


def _top_n(conf_BT: torch.Tensor, n_B: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T]: the n_B[b] highest-confidence positions of each row."""
    k = int(n_B.max())
    commit_BT = torch.zeros_like(conf_BT, dtype=torch.bool)
    if k == 0:
        return commit_BT
    idx_Bk = conf_BT.topk(k, dim=-1).indices
    keep_Bk = torch.arange(k, device=conf_BT.device)[None, :] < n_B[:, None]
    commit_BT.scatter_(1, idx_Bk, keep_Bk)
    return commit_BT


def _all_finished(x_BT: torch.Tensor, P: int, end: int, eos_id: int, mask_id: int) -> bool:
    """Every row has an EOS in its generated part with no mask before it."""
    gen = x_BT[:, P:end]
    is_eos = gen == eos_id
    if not is_eos.any(-1).all():
        return False
    first_eos_B = is_eos.float().argmax(-1)
    before_BL = torch.arange(gen.shape[1], device=gen.device)[None, :] < first_eos_B[:, None]
    return not ((gen == mask_id) & before_BL).any()


def trim_after_eos(ids: list[int], eos_id: int) -> list[int]:
    """The generated ids up to (not including) the first EOS."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
