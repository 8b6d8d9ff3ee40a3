"""The absorbing-state (masked) diffusion objective, as pure functions.

Forward process: each real token of x0 becomes ``mask_id`` independently with probability p(t).
Training loss: cross-entropy on the masked positions, weighted by 1/p(t), summed and divided by the
number of real tokens: the negative ELBO per token, an upper bound on the NLL.

``mask_rows`` is the one forward process: the Ray Data pipeline masks the training rows with it in
its workers, and the tests check it directly. With ``complementary`` it also gives each row the
complement of its draw (Fast-dLLM v2), which ``with_complements`` turns into rows of the batch.

Shape legend:  B batch, L sequence length, V vocab.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dlm_ray.config.schema import DiffusionConfig

Array = np.ndarray | torch.Tensor
ModelFn = Callable[..., torch.Tensor]


# ------------------------------------------------------------------------------------- noise levels


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seed: int, epoch_R: np.ndarray, key_R: np.ndarray, num: int) -> np.ndarray:
    """Uniforms in [0, 1), shape [R, num], a pure function of (seed, epoch, key, column).

    A counter-based generator (splitmix64 of the mixed counters), vectorised over the rows: a row
    gets the same numbers whatever batch or worker it lands in, at numpy speed.
    """
    epoch_R, key_R = np.asarray(epoch_R), np.asarray(key_R)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) ^ _splitmix64(epoch_R.astype(np.uint64) ^ _splitmix64(key_R.astype(np.uint64))))
        x = _splitmix64(key[:, None] + np.arange(num, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_times(cfg: DiffusionConfig, *, seed: int, epoch_R: np.ndarray, item_id: int, row_index_R: np.ndarray,
                 row_id_R: np.ndarray, strata: int) -> np.ndarray:
    """t in [eps, 1] per row, a function of (seed, epoch, row) alone.

    ``uniform``: i.i.d. per row. ``low_discrepancy`` (MDLM): the rows of a work item, in order, form
    groups of ``strata``; row j of a group gets t in the j-th of ``strata`` equal slices, at one
    random offset shared by the group. Any ``strata`` consecutive rows of an item therefore cover
    every slice once, so a micro-batch of consecutive rows has evenly spread t: lower-variance
    gradients than i.i.d. draws, with the same marginal distribution.
    """
    if cfg.time_sampling == "uniform" or strata <= 1:
        u_R = counter_uniforms(seed, epoch_R, row_id_R, 1)[:, 0]
    else:
        row_index_R = np.asarray(row_index_R, dtype=np.int64)
        group_R = row_index_R // strata
        # The group's key mixes the item in, so groups of different items get unrelated offsets.
        offset_R = counter_uniforms(seed, epoch_R, group_R.astype(np.uint64) ^ np.uint64(item_id), 1)[:, 0]
        u_R = (offset_R + row_index_R % strata) / strata
    return (1.0 - cfg.eps) * u_R + cfg.eps


def mask_probability(t: Array, cfg: DiffusionConfig) -> Array:
    """p(t): the chance a real token is masked at time t."""
    if cfg.schedule == "linear":
        return (1.0 - cfg.eps) * t + cfg.eps
    return (1.0 - cfg.eps) * t


def apply_mask(x0_BL: Array, p_B: Array, u_BL: Array, maskable_BL: Array, mask_id: int) -> tuple[Array, Array]:
    """Mask position (b, i) iff it is maskable and u[b, i] < p[b]. Returns (xt_BL, masked_BL).

    The uniforms ``u_BL`` come from the caller, so it owns the randomness. Works on numpy and torch.
    """
    p_BL = p_B[:, None] if p_B.ndim == 1 else p_B  # a probability per row, or per position (blocks)
    masked_BL = (u_BL < p_BL) & maskable_BL
    if isinstance(x0_BL, torch.Tensor):
        return torch.where(masked_BL, torch.full_like(x0_BL, mask_id), x0_BL), masked_BL
    return np.where(masked_BL, mask_id, x0_BL).astype(x0_BL.dtype), masked_BL


GOLDEN = 0.6180339887498949  # block k's time is the row's shifted by k golden ratios (mod 1)


def mask_rows(rows: dict[str, np.ndarray], cfg: DiffusionConfig, *, seed: int, mask_id: int, item_id: int = 0,
              strata: int = 1, prompt_len_R: np.ndarray | None = None,
              block_size: int | None = None) -> dict[str, np.ndarray]:
    """The forward diffusion training uses: rows plus ``noisy_ids``, ``loss_mask``, ``t``, ``p_mask``
    and ``num_maskable`` (per row: the tokens the process may mask, which the bound is over).

    ``rows`` holds ``input_ids`` and ``attention_mask`` [R, L] and per row ``epoch``, ``row_id``
    (stable across runs) and ``row_index`` (its position within its work item, ``item_id``). Every
    draw is a function of (seed, epoch, row): a rerun masks a row the same way, each epoch afresh,
    whichever batch or worker it lands in. Padding is never masked; with ``prompt_len_R`` (the SFT
    variant) nor are the first ``prompt_len`` tokens of a row, nor, with a ``given`` column
    (conditional pretraining), the positions it flags.

    With ``block_size`` (block diffusion) every block of a row has its own noise level: i.i.d. under
    ``uniform``; under ``low_discrepancy`` block k's is the row's (stratified over the micro-batch)
    shifted by k golden ratios mod 1, so a row's blocks spread over [0, 1) too. ``t`` is then
    [R, blocks] and ``p_mask`` [R, L], per position.
    """
    x0_RL = rows["input_ids"]
    R, L = x0_RL.shape
    t_R = sample_times(cfg, seed=seed, epoch_R=rows["epoch"], item_id=item_id, row_index_R=rows["row_index"],
                       row_id_R=rows["row_id"], strata=strata)
    p_R = mask_probability(t_R, cfg)
    if block_size is not None:
        K = L // block_size
        if cfg.time_sampling == "uniform":
            u_RK = counter_uniforms(seed, rows["epoch"], rows["row_id"], L + 1 + K)[:, L + 1:]
        else:
            u_RK = ((t_R - cfg.eps) / (1.0 - cfg.eps))[:, None] + GOLDEN * np.arange(K)[None, :]
            u_RK = u_RK - np.floor(u_RK)
        t_R = (1.0 - cfg.eps) * u_RK + cfg.eps
        p_R = np.repeat(mask_probability(t_R, cfg), block_size, axis=1)
    maskable_RL = rows["attention_mask"].astype(bool)
    if "given" in rows:  # conditional pretraining: a document's prompt stays visible
        maskable_RL = maskable_RL & ~rows["given"].astype(bool)
    if prompt_len_R is not None:
        maskable_RL = maskable_RL & (np.arange(L)[None, :] >= np.asarray(prompt_len_R)[:, None])
    # Column 0 of the per-row draws is left to sample_times' i.i.d. case; positions use 1..L.
    u_RL = counter_uniforms(seed, rows["epoch"], rows["row_id"], L + 1)[:, 1:]
    noisy_RL, masked_RL = apply_mask(x0_RL, p_R, u_RL, maskable_RL, mask_id)
    out = {**rows, "noisy_ids": noisy_RL.astype(np.int32), "loss_mask": masked_RL,
           "t": t_R.astype(np.float32), "p_mask": p_R.astype(np.float32),
           "num_maskable": maskable_RL.sum(1).astype(np.int32)}
    if cfg.complementary:
        # The complement of the same draw: a maskable position is masked iff u >= p, a draw of the
        # forward process at 1 - p (kept >= eps: its 1/p weight stays bounded as the row's does).
        masked_c_RL = maskable_RL & ~masked_RL
        p_c = np.maximum(1.0 - np.asarray(p_R, dtype=np.float64), cfg.eps)
        out.update(noisy_ids_c=np.where(masked_c_RL, mask_id, x0_RL).astype(np.int32), loss_mask_c=masked_c_RL,
                   p_mask_c=p_c.astype(np.float32))
    return out


COMPLEMENT_COLUMNS = {"noisy_ids": "noisy_ids_c", "loss_mask": "loss_mask_c", "p_mask": "p_mask_c"}


def with_complements(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of complementary pairs (``mask_rows`` with ``complementary``) as 2B rows: the B rows
    as drawn, then the same B rows under the complementary masks. Every other per-row column is
    repeated, so a loss over real tokens averages the two views; a batch without pairs is returned
    as it is."""
    if "noisy_ids_c" not in batch:
        return batch
    out = {}
    for name, value in batch.items():
        if name in COMPLEMENT_COLUMNS.values():
            continue
        other = batch.get(COMPLEMENT_COLUMNS.get(name, name))
        out[name] = torch.cat([value, other], 0)
    return out


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
    row_weight_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_masked −log pθ(x0|xt) / p(t), over the number of real tokens: NELBO per token (scalar).

    ``num_real_tokens`` is passed in rather than counted here so that data-parallel workers can
    normalise by the global count and their gradients add up to the full-batch gradient. The SFT
    form weights each row by 1 / its answer length (``row_weight_B``) and divides by the rows.
    """
    nll_BL = masked_token_nll(logits_BLV, x0_BL, masked_BL.bool(), mask_id)
    p_BL = p_mask_B.float()[:, None] if p_mask_B.dim() == 1 else p_mask_B.float()  # per row, or per position
    per_row_B = (nll_BL / p_BL).sum(-1)
    if row_weight_B is not None:
        per_row_B = per_row_B * row_weight_B.float()
    return per_row_B.sum() / num_real_tokens


def confident_entropy(logits_BLV: torch.Tensor, x0_BL: torch.Tensor, masked_BL: torch.Tensor,
                      mask_id: int) -> torch.Tensor:
    """H(pθ(·|xt)) in nats at the masked positions whose argmax is already x0, 0 elsewhere: [B, L]
    float32. The entropy is over the same distribution the loss scores (the mask token excluded);
    which positions count is decided without a gradient, so only their entropies are pushed."""
    ent_BL = torch.zeros(x0_BL.shape, dtype=torch.float32, device=x0_BL.device)
    if masked_BL.any():
        logits_NV = exclude_mask_logit(logits_BLV[masked_BL].float(), mask_id)
        logp_NV = logits_NV.log_softmax(-1)
        right_N = logits_NV.detach().argmax(-1) == x0_BL[masked_BL]
        # exp(-inf) * -inf is nan: the mask's column (probability 0) adds nothing to the entropy.
        h_N = -(logp_NV.exp() * logp_NV.masked_fill(torch.isinf(logp_NV), 0.0)).sum(-1)
        ent_BL[masked_BL] = torch.where(right_N, h_N, torch.zeros_like(h_N))
    return ent_BL


def cap_term(logits_BLV: torch.Tensor, x0_BL: torch.Tensor, masked_BL: torch.Tensor,
             num_real_tokens: torch.Tensor | int, *, mask_id: int,
             row_weight_B: torch.Tensor | None = None) -> torch.Tensor:
    """Confidence-aware parallel training's term (LLaDA 2.0): the entropy of the prediction at each
    masked position the model already gets right, summed and divided as the bound is (over the real
    tokens, or per row by its answer length and over the rows), with no 1/p(t) weight. The training
    objective is the bound + ``DiffusionConfig.cap_weight`` times this."""
    per_row_B = confident_entropy(logits_BLV, x0_BL, masked_BL.bool(), mask_id).sum(-1)
    if row_weight_B is not None:
        per_row_B = per_row_B * row_weight_B.float()
    return per_row_B.sum() / num_real_tokens


# ---------------------------------------------------------------------------------- NELBO estimate


@torch.no_grad()
def masked_nelbo(
    model: ModelFn,
    input_ids_BL: torch.Tensor,
    *,
    mask_id: int,
    num_samples: int,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    maskable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative ELBO in nats per real token, per row: Tensor[B].

    With ``maskable`` [B, L] (say, the answer after a prompt) only those positions are masked and
    scored: the bound on -log p(answer | prompt) per answer token, as LLaDA scores a completion.

    The low-variance form: per sample draw a count l in 1..n (n = the row's real tokens), mask
    exactly l real positions uniformly without replacement and weight the masked cross-entropy by
    n / l. The counts are stratified across samples (evenly spaced with one random offset), so a
    few dozen samples give a stable figure. A model with uniform logits over the V - 1 predictable
    tokens (the mask excluded) scores exactly log(V - 1). This is the full-attention bound; every
    kind's is ``likelihood.estimate_nelbo``.
    """
    _check_samples(num_samples)
    device = input_ids_BL.device
    B, L = input_ids_BL.shape
    real_BL = torch.ones_like(input_ids_BL, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if maskable is not None:
        real_BL = real_BL & maskable.bool()
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


def _check_samples(num_samples: int) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


@torch.no_grad()
def block_nelbo(model: ModelFn, input_ids_BL: torch.Tensor, *, block_size: int, mask_id: int, num_samples: int,
                attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                maskable: torch.Tensor | None = None) -> torch.Tensor:
    """The block diffusion bound, nats per real token [B]: the sum over blocks of each block's NELBO
    given the clean blocks before it. Per sample and block, l of the block's n real tokens are masked
    (l stratified across samples as above) and weighted by n / l; one noisy-and-clean forward scores
    every block at once."""
    _check_samples(num_samples)
    device = input_ids_BL.device
    B, L = input_ids_BL.shape
    size = block_size
    if L % size:
        raise ValueError(f"estimate_nelbo: length {L} is not a multiple of the block size {size}")
    real_BL = torch.ones_like(input_ids_BL, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if maskable is not None:
        real_BL = real_BL & maskable.bool()
    n_BK = real_BL.view(B, L // size, size).sum(-1)
    if (n_BK.sum(-1) == 0).any():
        raise ValueError("estimate_nelbo: a row has no real tokens")
    offset = torch.rand((), generator=generator, device=device)
    total_B = torch.zeros(B, dtype=torch.float64, device=device)
    for s in range(num_samples):
        frac = (s + offset) / num_samples
        l_BK = (frac * n_BK).long().clamp(max=(n_BK - 1).clamp(min=0)) + 1  # in 1..n (1 for an empty block)
        scores_BL = torch.rand((B, L), generator=generator, device=device).masked_fill(~real_BL, 2.0)
        rank_BL = scores_BL.view(B, -1, size).argsort(-1).argsort(-1).view(B, L)
        masked_BL = (rank_BL < l_BK.repeat_interleave(size, -1)) & real_BL
        xt_BL = input_ids_BL.masked_fill(masked_BL, mask_id)
        logits_BLV = model(xt_BL, attention_mask, clean_ids=input_ids_BL)
        nll_BL = masked_token_nll(logits_BLV, input_ids_BL, masked_BL, mask_id)
        weight_BL = (n_BK / l_BK).repeat_interleave(size, -1)
        total_B += (nll_BL.double() * weight_BL).sum(-1)
    return (total_B / num_samples / n_BK.sum(-1)).float()
