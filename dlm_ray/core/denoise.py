"""The diffusion sampler: iterative unmasking of a canvas of masks after the prompt.

``generate`` here runs a diffusion model (full attention, or block-causal in its own blocks); the
front door that serves every kind of model, and checks what a kind can run, is
``dlm_ray.core.sampling.generate``. It knows no tokenizer and no transport. With
``temperature=0`` and ``remasking="low_confidence"`` it is LLaDA's reference algorithm:

- the canvas is the (left-padded) prompt followed by ``gen_length`` masks, split into blocks of
  ``block_length`` that are finished one after another (semi-autoregressive);
- each block gets ``steps / num_blocks`` steps; with m masks and k steps, step i commits
  ⌊m/k⌋ tokens, plus one for the first m mod k steps;
- each step calls the model on the whole canvas, proposes x̂ = argmax(logits/T + Gumbel) (float64),
  scores each masked position of the current block by softmax(logits)[x̂] (or a uniform draw for
  ``random``) and commits the top-n.

Infilling: ``generate`` takes a suffix (the prompt/suffix form, the canvas prompt + masks + suffix)
and ``infill`` fills masks wherever they stand in a given canvas; both need full attention.
Batching many prompts of any lengths is ``dlm_ray.core.batching``.

One deliberate difference from the reference code: the mask token is never proposed (its logit is
-inf), so a weak or untrained model can never "commit" a mask and leave the canvas unfinished.

An answer ends at any of ``end_ids`` (EOS, and an instruct model's end-of-turn token). With
``confidence_eos_eot_inf`` the proposals of those tokens rank below every other proposal of the
block, whatever the temperature (the reference code writes -inf into a tensor it no longer reads
at T > 0, so its EOS proposals keep their confidence).

Shape legend:  B batch, P prompt length, T canvas length (P + gen_length), V vocab.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from dlm_ray.config.schema import SampleConfig, sub_block_problem
from dlm_ray.core.commit_rules import (entropy, num_commits, num_transfer_tokens, sub_block_schedule, sub_block_step,
                                       top_n)
from dlm_ray.core.diffusion import exclude_mask_logit
from dlm_ray.core.kv_cache import block_step

LAST = -1.0  # a confidence below any probability, yet finite: the position is still a mask to fill
ModelFn = Callable[..., torch.Tensor]
# One generator for the batch, or one per row: per-row generators make each row's output independent
# of which other rows share its batch (the batch job seeds every row on its own).
Generators = torch.Generator | Sequence[torch.Generator] | None
# Called after every step with (step index, canvas [B, T]): lets Serve stream partial text. It may
# return a bool [B] of rows to stop now (a client that went away): their remaining masks become EOS
# and they leave the following model calls.
StepCallback = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def uniform(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Float64 U(0, 1) draws of ``shape`` (batch first); with a list, row b comes from generator b."""
    return _draws(torch.rand, torch.float64, shape, generator, device)


def normal(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Float32 N(0, 1) draws of ``shape`` (batch first); with a list, row b comes from generator b."""
    return _draws(torch.randn, torch.float32, shape, generator, device)


def _draws(draw: Callable[..., torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...], generator: Generators,
           device: torch.device) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = device if generator is None else generator.device
        return draw(shape, dtype=dtype, generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([draw(shape[1:], dtype=dtype, generator=g, device=g.device) for g in generator]).to(device)


def propose(logits_BTV: torch.Tensor, temperature: float, generator: Generators) -> torch.Tensor:
    """x̂ = argmax(logits / T + Gumbel noise), in float64: low precision flattens the noise."""
    if temperature == 0:
        return logits_BTV.argmax(-1)
    u = uniform(tuple(logits_BTV.shape), generator, logits_BTV.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits_BTV.double() / temperature + gumbel).argmax(-1)


def check_request(model: ModelFn, prompt_ids_BP: torch.Tensor, cfg: SampleConfig, *, mask_id: int,
                  attention_mask: torch.Tensor | None, max_length: int | None, eos_id: int | None) -> int | None:
    """What every sampler needs of a request (shapes, padding, lengths, an EOS for the settings that
    use one); returns the context length to respect (the model's ``max_seq_len`` by default)."""
    if max_length is None:
        max_length = getattr(model, "max_seq_len", None)
    _validate(prompt_ids_BP, cfg, mask_id, attention_mask, max_length)
    if (cfg.stop_at_eos or cfg.logits_eos_inf or cfg.confidence_eos_eot_inf) and eos_id is None:
        raise ValueError("stop_at_eos, logits_eos_inf and confidence_eos_eot_inf need eos_id")
    return max_length


def end_tokens(eos_id: int | None, end_ids: Sequence[int] | None, device: torch.device) -> torch.Tensor:
    """The ids that end an answer (EOS and any end-of-turn ids), as a tensor for ``torch.isin``."""
    return torch.tensor(sorted({eos_id, *(end_ids or ())}) if eos_id is not None else [], dtype=torch.long,
                        device=device)


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
    if cfg.refresh_every is not None and cfg.cache not in ("prefix", "dual"):
        raise ValueError(f"refresh_every={cfg.refresh_every} needs cache 'prefix' or 'dual', got cache={cfg.cache!r}")
    problem = sub_block_problem(cfg.block_length, cfg.steps // cfg.num_blocks, cfg.sub_block_length)
    if problem:  # a config adapted to a model's own blocks skips the schema's check
        raise ValueError(problem)
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
    cfg_scale: float, mask_id: int, span: tuple[int, int], gen_start: int,
) -> torch.Tensor:
    """Logits of the positions in ``span`` (the current block): from the model alone when it can
    (``supports_logits_span``), else cut from the whole canvas's. Blocks are counted from the
    generation start (a block-causal model reads it; full attention ignores it)."""
    def call(x: torch.Tensor, am: torch.Tensor | None) -> torch.Tensor:
        if getattr(model, "supports_logits_span", False):
            return model(x, am, logits_span=span, block_start=gen_start)
        return model(x, am)[:, span[0]:span[1]]

    if cfg_scale == 0:
        return call(x_BT, am_BT)
    # Unsupervised classifier-free guidance: the unconditional pass sees the prompt fully masked.
    un_x_BT = x_BT.masked_fill(prompt_real_BT, mask_id)
    am2 = None if am_BT is None else torch.cat([am_BT, am_BT])
    cond, uncond = call(torch.cat([x_BT, un_x_BT]), am2).chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


@torch.inference_mode()
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
    """Fill ``cfg.gen_length`` positions after each prompt: LongTensor[B, P + gen_length].

    With ``suffix_ids`` [B, S] (right-padded, ``suffix_mask`` 1 for real tokens) the positions are
    filled between the prompt and the suffix (infilling: every model call sees both sides), and
    the canvas [B, P + gen_length + S] is returned. Only a full-attention model can infill.

    ``max_length`` defaults to the model's ``max_seq_len`` when it has one. ``eos_id`` is needed only
    for ``cfg.stop_at_eos``. Random draws cover the current block only, so with one generator per
    row a row's output does not depend on the rows batched with it. Rows with nothing left to do in
    the current block (finished early, or stopped at EOS) are left out of the model calls. If given,
    ``stats["model_calls"]`` receives the number of model calls (forward passes over the batch).
    ``vocab_size`` (the tokenizer's) limits proposals to ids below it: a model's head may be wider
    than its tokenizer (the tiny preset: 264 logits, 259 byte-tokenizer ids), and an id the tokenizer
    cannot decode must never be committed. ``end_ids`` (default: EOS alone) are the tokens that end
    an answer, for the early stop and ``confidence_eos_eot_inf``.
    """
    max_length = check_request(model, prompt_ids_BP, cfg, mask_id=mask_id, attention_mask=attention_mask,
                               max_length=max_length, eos_id=eos_id)
    ends = end_tokens(eos_id, end_ids, prompt_ids_BP.device)
    S = 0 if suffix_ids is None else suffix_ids.shape[1]
    if S:
        _check_suffix(model, cfg, suffix_ids, suffix_mask, prompt_ids_BP.shape[0], mask_id, max_length,
                      prompt_ids_BP.shape[1])
    _check_cache(model, cfg, prompt_ids_BP.shape[1])
    B, P = prompt_ids_BP.shape
    if not (generator is None or isinstance(generator, torch.Generator)) and len(generator) != B:
        raise ValueError(f"got {len(generator)} generators for a batch of {B}")
    device = prompt_ids_BP.device
    parts = [prompt_ids_BP, torch.full((B, cfg.gen_length), mask_id, dtype=torch.long, device=device)]
    x_BT = torch.cat(parts + ([suffix_ids.long()] if S else []), 1)
    am_BT = None
    prompt_real_BT = torch.zeros_like(x_BT, dtype=torch.bool)  # the given tokens: prompt and suffix
    prompt_real_BT[:, :P] = True if attention_mask is None else attention_mask.bool()
    suffix_real_BS = None
    if S:
        suffix_real_BS = torch.ones_like(suffix_ids, dtype=torch.bool) if suffix_mask is None else suffix_mask.bool()
        prompt_real_BT[:, P + cfg.gen_length:] = suffix_real_BS
    # Without padding the model gets no mask at all, so attention can take its fused kernel.
    padded = (attention_mask is not None and not bool(attention_mask.bool().all())) or \
        (suffix_real_BS is not None and not bool(suffix_real_BS.all()))
    if padded:
        am_BT = (prompt_real_BT | (x_BT == mask_id)).long()
    return _denoise(model, x_BT, am_BT, prompt_real_BT, cfg, start=P, mask_id=mask_id, generator=generator,
                    eos_id=eos_id, ends=ends, on_step=on_step, stats=stats, vocab_size=vocab_size)


@torch.inference_mode()
def infill(model: ModelFn, canvas_BT: torch.Tensor, cfg: SampleConfig, *, mask_id: int,
           attention_mask: torch.Tensor | None = None, generator: Generators = None,
           stats: dict[str, int] | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Fill every ``mask_id`` of a canvas [B, T], wherever it stands (a Sudoku's blanks, a gap in a
    sentence): a copy of the canvas, filled. The masks are one block; each row commits its own
    masks over ``cfg.steps`` steps (at most one step per mask), most confident first, with
    ``cfg``'s temperature, remasking, threshold or factor and guidance. ``gen_length``,
    ``block_length``, the caches and ``stop_at_eos`` do not apply. Needs a model that sees what
    follows each position (``sampling.infill`` checks the kind)."""
    if canvas_BT.dim() != 2:
        raise ValueError(f"canvas must be [batch, length], got shape {tuple(canvas_BT.shape)}")
    max_length = getattr(model, "max_seq_len", None)
    if max_length is not None and canvas_BT.shape[1] > max_length:
        raise ValueError(f"canvas length {canvas_BT.shape[1]} exceeds the model's context of {max_length}")
    masked_BT = canvas_BT == mask_id
    if attention_mask is not None and (masked_BT & ~attention_mask.bool()).any():
        raise ValueError("a padding position holds mask_id")
    cols = masked_BT.any(0).nonzero().squeeze(-1)
    x_BT = canvas_BT.clone().long()
    if cols.numel() == 0:
        return x_BT
    a, b = int(cols[0]), int(cols[-1]) + 1
    run = cfg.model_copy(update={"gen_length": b - a, "block_length": b - a, "steps": min(cfg.steps, b - a),
                                 "cache": "none", "refresh_every": None, "stop_at_eos": False,
                                 "sub_block_length": None})
    am = None if attention_mask is None or bool(attention_mask.bool().all()) else attention_mask.long()
    given_BT = ~masked_BT if attention_mask is None else attention_mask.bool() & ~masked_BT
    ends = torch.zeros(0, dtype=torch.long, device=x_BT.device)
    return _denoise(model, x_BT, am, given_BT, run, start=a, mask_id=mask_id, generator=generator, eos_id=None,
                    ends=ends, on_step=None, stats=stats, vocab_size=vocab_size)


def _check_suffix(model: ModelFn, cfg: SampleConfig, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor | None,
                  B: int, mask_id: int, max_length: int | None, P: int) -> None:
    if suffix_ids.dim() != 2 or suffix_ids.shape[0] != B:
        raise ValueError(f"suffix_ids must be [batch={B}, suffix_len], got shape {tuple(suffix_ids.shape)}")
    if suffix_mask is not None and suffix_mask.shape != suffix_ids.shape:
        raise ValueError(f"suffix_mask shape {tuple(suffix_mask.shape)} != suffix shape {tuple(suffix_ids.shape)}")
    real = torch.ones_like(suffix_ids, dtype=torch.bool) if suffix_mask is None else suffix_mask.bool()
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("suffixes must be right-padded (suffix_mask 1s before 0s in each row)")
    if (suffix_ids == mask_id).any():  # padding too: it would be taken for a position to fill
        raise ValueError("a suffix contains mask_id")
    total = P + cfg.gen_length + suffix_ids.shape[1]
    if max_length is not None and total > max_length:
        raise ValueError(f"prompt {P} + gen_length {cfg.gen_length} + suffix {suffix_ids.shape[1]} = {total} tokens "
                         f"exceeds the model's context of {max_length}")
    if cfg.cache == "blocks":
        raise ValueError("cache='blocks' cannot infill")


def _denoise(model: ModelFn, x_BT: torch.Tensor, am_BT: torch.Tensor | None, prompt_real_BT: torch.Tensor,
             cfg: SampleConfig, *, start: int, mask_id: int, generator: Generators, eos_id: int | None,
             ends: torch.Tensor, on_step: StepCallback | None, stats: dict[str, int] | None,
             vocab_size: int | None) -> torch.Tensor:
    """Unmask the ``cfg.gen_length`` positions from ``start`` on, block after block, in place.
    Everything else in the canvas (prompt, suffix) is context."""
    B, P, device = x_BT.shape[0], start, x_BT.device
    gen_end = P + cfg.gen_length
    steps_per_block = cfg.steps // cfg.num_blocks
    num_calls = step = 0
    # cache="blocks": keys/values of the prompt and every finished block (of the rows cache_rows_H,
    # on the host), written in place; the pass that starts a block also writes the finished one.
    blocks_cache, cache_rows_H = None, None
    eos_only = ends[ends == eos_id]  # cut once: a boolean index waits for the device
    for blk in range(cfg.num_blocks):
        start, end = P + blk * cfg.block_length, P + (blk + 1) * cfg.block_length
        if cfg.sub_block_length is None:
            counts_BS = num_transfer_tokens((x_BT[:, start:end] == mask_id).sum(-1), steps_per_block)
        else:  # each sub-block's schedule over its share of the steps
            counts_BNK, first_N = sub_block_schedule(x_BT[:, start:end] == mask_id, steps_per_block,
                                                     cfg.sub_block_length)
        cache, cache_rows = None, None
        for i in range(steps_per_block):
            # The step's one wait for the device: which rows still have masks in the block (none: it
            # is done). The row list stays on the host for the generators and the cache's rows.
            rows_H = (x_BT[:, start:end] == mask_id).any(-1).cpu().nonzero().squeeze(-1)
            if rows_H.numel() == 0:
                break  # the block is done in every row
            rows_A = rows_H.to(device, non_blocking=True)
            every = rows_H.numel() == B  # no gather when all rows are still at work
            xa_AT = x_BT if every else x_BT[rows_A]
            ama_AT = am_BT if every or am_BT is None else am_BT[rows_A]
            refresh = i == 0 or (cfg.refresh_every is not None and i % cfg.refresh_every == 0)
            if cfg.cache == "none":
                pr_AT = prompt_real_BT if every else prompt_real_BT[rows_A]
                logits_ALV = _logits(model, xa_AT, ama_AT, pr_AT, cfg.cfg_scale, mask_id, (start, end), P)
            elif cfg.cache == "blocks":
                logits_ALV, blocks_cache, cache_rows_H = block_step(  # type: ignore[arg-type]
                    model, xa_AT, ama_AT, blocks_cache, cache_rows_H, rows_H, P, start, end, gen_end, first=i == 0)
            elif refresh:
                logits_ALV, cache = model.prefill(xa_AT, ama_AT, logits_span=(start, end))  # type: ignore[attr-defined]
                cache_rows = rows_H
            else:
                if not torch.equal(cache_rows, rows_H):  # some rows finished the block: drop them (host lists)
                    cache, cache_rows = cache.rows(torch.searchsorted(cache_rows, rows_H).to(device)), rows_H
                stop = x_BT.shape[1] if cfg.cache == "prefix" else end
                logits_ALV = model.forward_window(xa_AT[:, start:stop], start, cache,  # type: ignore[attr-defined]
                                                  logits_len=end - start)
            num_calls += 1
            if vocab_size is not None:
                logits_ALV = logits_ALV[..., :vocab_size]  # softmax and argmax over real tokens only
            logits_ALV = exclude_mask_logit(logits_ALV, mask_id)
            if cfg.logits_eos_inf:
                logits_ALV = logits_ALV.index_fill(-1, eos_only, float("-inf"))
            gen = generator if generator is None or isinstance(generator, torch.Generator) \
                else [generator[r] for r in rows_H.tolist()]
            x0_AL = propose(logits_ALV, cfg.temperature, gen)
            if cfg.remasking == "low_confidence":
                conf_AL = logits_ALV.softmax(-1).gather(-1, x0_AL[..., None]).squeeze(-1).double()
            else:
                conf_AL = uniform(tuple(x0_AL.shape), gen, device)
            block_AL = xa_AT[:, start:end]
            if cfg.confidence_eos_eot_inf:
                conf_AL = conf_AL.masked_fill(torch.isin(x0_AL, ends), LAST)
            conf_AL = conf_AL.masked_fill(block_AL != mask_id, float("-inf"))  # only masks compete
            if cfg.sub_block_length is None:
                schedule_A = counts_BS[rows_A, i]
            else:  # only the row's first sub-block with masks competes
                schedule_A, current_AL = sub_block_step(counts_BNK[rows_A], first_N, block_AL == mask_id, i,
                                                        cfg.sub_block_length)
                conf_AL = conf_AL.masked_fill(~current_AL, float("-inf"))
            entropy_AL = entropy(logits_ALV) if cfg.entropy_bound is not None else None
            commit_AL = top_n(conf_AL, num_commits(conf_AL, schedule_A, cfg, entropy_AL))
            x_BT[rows_A, start:end] = torch.where(commit_AL, x0_AL, block_AL)
            if cfg.stop_at_eos:
                # A row with an EOS and no mask before it is finished: its remaining masks become
                # EOS at once, so it costs no more model calls (mid-block too).
                gen_BG = x_BT[:, P:gen_end]  # a view: filled in place, without a boolean index's wait
                done_B = _finished_rows(gen_BG, ends, mask_id)
                gen_BG.masked_fill_(done_B[:, None] & (gen_BG == mask_id), eos_id)  # type: ignore[arg-type]
            if on_step is not None:
                stop_B = on_step(step, x_BT)
                if stop_B is not None and bool(stop_B.any()):
                    if eos_id is None:
                        raise ValueError("stopping rows from on_step needs eos_id")
                    rows_SB = x_BT[stop_B]
                    x_BT[stop_B] = rows_SB.masked_fill(rows_SB == mask_id, eos_id)  # a suffix holds no mask
            step += 1
    if stats is not None:
        stats["model_calls"] = num_calls
    return x_BT


def _check_cache(model: ModelFn, cfg: SampleConfig, P: int) -> None:
    """What a cache needs of the model and the request (which caches a kind of model may use is
    ``kinds``' to say)."""
    if cfg.cache != "none":
        needed = ("prefill", "forward_block") if cfg.cache == "blocks" else ("prefill", "forward_window")
        if not all(hasattr(model, n) for n in needed):
            raise ValueError(f"cache={cfg.cache!r} needs a model with {' and '.join(needed)}(), like "
                             "dlm_ray.core.model.Denoiser")
        if cfg.cfg_scale:
            raise ValueError("cache is not supported with cfg_scale > 0")
        if cfg.cache == "blocks" and P == 0:
            raise ValueError("cache='blocks' needs a prompt of at least one token")


def _finished_rows(gen_BL: torch.Tensor, ends: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Bool [B]: the row has committed an end token (EOS, EOT) with no mask before it."""
    is_eos_BL = torch.isin(gen_BL, ends)
    first_eos_B = torch.where(is_eos_BL.any(-1), is_eos_BL.float().argmax(-1), gen_BL.shape[1])
    before_BL = torch.arange(gen_BL.shape[1], device=gen_BL.device)[None, :] < first_eos_B[:, None]
    return is_eos_BL.any(-1) & ~((gen_BL == mask_id) & before_BL).any(-1)
