"""How many positions a diffusion step commits: the reference schedule, and rules that commit more.

The reference schedule (LLaDA) gives each of a block's k steps ⌊m/k⌋ of its m masks, plus one for
the first m mod k steps (``num_transfer_tokens``). ``num_commits`` raises it by one rule: the
threshold or the factor (Fast-dLLM), on the confidences alone, or the entropy bound; sub-blocks
restrict where a step may commit:

- the entropy bound (EB-sampler): the masked positions, most confident first, are committed while
  their summed entropy stays <= γ. A position's entropy is that of the distribution its confidence
  comes from (softmax of the same logits), in nats;
- sub-blocks (Fast-dLLM v2): a block is decoded sub-block after sub-block; a step may commit only in
  the first sub-block of its row that still has masks. The block's steps are shared out among its
  sub-blocks (earlier ones take the remainder) and each sub-block follows the reference schedule
  over its share; it starts as soon as the one before it is done (at the latest on its share's
  first step), so every block still finishes within its steps.

Shape legend:  B batch, A rows at work, L block length, V vocab, N sub-blocks, K steps of one.
"""

from __future__ import annotations

import torch

from dlm_ray.config.schema import SampleConfig


def num_transfer_tokens(num_masked_B: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step [B, steps]: as even as possible, earlier steps take the remainder."""
    base_B1 = (num_masked_B // steps)[:, None]
    rem_B1 = (num_masked_B % steps)[:, None]
    step_idx = torch.arange(steps, device=num_masked_B.device)[None, :]
    return base_B1 + (step_idx < rem_B1).long()


def entropy(logits_ALV: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per position, float64 [A, L]; -inf logits (excluded
    tokens) contribute nothing. Computed in float32 at least (not float64: at a vocabulary of
    126k a block's [A, L, V] in float64 is gigabytes)."""
    logp_ALV = logits_ALV.float().log_softmax(-1) if logits_ALV.dtype != torch.float64 else logits_ALV.log_softmax(-1)
    plogp_ALV = logp_ALV.exp() * logp_ALV.masked_fill(torch.isinf(logp_ALV), 0.0)
    return (-plogp_ALV.sum(-1)).clamp_min(0.0).double()  # never below 0: the running sums only grow


def entropy_bounded_count(conf_AL: torch.Tensor, entropy_AL: torch.Tensor, bound: float) -> torch.Tensor:
    """Per row, the length of the longest run of most-confident candidates (finite confidence) whose
    summed entropy less the largest of them is <= ``bound`` (the EB-sampler's error proxy: the
    most uncertain position of a step is paid for by the step itself, so one position always
    fits): LongTensor [A]. The sort is stable, as ``top_n``'s, so tied confidences are counted in
    the order they are committed."""
    conf_sorted_AL, order_AL = conf_AL.sort(dim=-1, descending=True, stable=True)
    ent_sorted_AL = entropy_AL.gather(-1, order_AL)
    # Entropies are >= 0, so the sum less the running maximum never falls as the run grows.
    spent_AL = ent_sorted_AL.cumsum(-1) - ent_sorted_AL.cummax(-1).values
    ok_AL = (spent_AL <= bound) & torch.isfinite(conf_sorted_AL)
    return ok_AL.long().cumprod(-1).sum(-1)


def sub_block_schedule(masked_BL: torch.Tensor, steps: int,
                       sub_block_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference schedule of each sub-block over its share of the block's ``steps``:
    (counts [B, N, K] with K the largest share, zero past a share; first step of each share [N])."""
    B, L = masked_BL.shape
    N = L // sub_block_length
    shares = [steps // N + (n < steps % N) for n in range(N)]  # on the host: no wait for the device
    masks_BN = masked_BL.view(B, N, sub_block_length).sum(-1)
    counts_BNK = torch.zeros(B, N, max(shares), dtype=torch.long, device=masked_BL.device)
    for n, share in enumerate(shares):
        counts_BNK[:, n, :share] = num_transfer_tokens(masks_BN[:, n], share)
    first_N = torch.tensor([sum(shares[:n]) for n in range(N)], device=masked_BL.device)
    return counts_BNK, first_N


def sub_block_step(counts_ANK: torch.Tensor, first_N: torch.Tensor, masked_AL: torch.Tensor, step: int,
                   sub_block_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row at work: (its schedule count this step [A], the positions of its current
    sub-block, the first that still has masks [A, L]). A row that finished a sub-block early starts
    the next at the top of that sub-block's schedule (its largest count)."""
    A, L = masked_AL.shape
    sub_L = torch.arange(L, device=masked_AL.device) // sub_block_length
    current_A = torch.where(masked_AL, sub_L, L).min(-1).values.clamp(max=counts_ANK.shape[1] - 1)
    within_A = (step - first_N[current_A]).clamp(0, counts_ANK.shape[2] - 1)
    rows_A = torch.arange(A, device=masked_AL.device)
    return counts_ANK[rows_A, current_A, within_A], sub_L[None, :] == current_A[:, None]


def num_commits(conf_AL: torch.Tensor, schedule_A: torch.Tensor, cfg: SampleConfig,
                entropy_AL: torch.Tensor | None = None) -> torch.Tensor:
    """How many positions each row commits this step: the reference schedule's count, raised by the
    threshold, factor or entropy-bound rule (and to at least one), never above the number of
    candidates left (the masks with a finite confidence). The entropy bound needs ``entropy_AL``."""
    num_masked_A = torch.isfinite(conf_AL).sum(-1)
    if cfg.entropy_bound is not None:
        if entropy_AL is None:
            raise ValueError("entropy_bound needs the positions' entropies")
        fast_A = entropy_bounded_count(conf_AL, entropy_AL, cfg.entropy_bound)
    elif cfg.threshold is not None:
        fast_A = (conf_AL >= cfg.threshold).sum(-1)
    elif cfg.factor is not None:
        sorted_AL = conf_AL.sort(-1, descending=True).values
        k_L = torch.arange(1, conf_AL.shape[1] + 1, device=conf_AL.device, dtype=conf_AL.dtype)
        ok_AL = sorted_AL >= 1 - cfg.factor / (k_L + 1)
        fast_A = ok_AL.long().cumprod(-1).sum(-1)  # the longest run from the most confident
    else:
        return torch.minimum(schedule_A, num_masked_A)
    return torch.minimum(torch.maximum(schedule_A, fast_A.clamp(min=1)), num_masked_A)


def top_n(conf_BT: torch.Tensor, n_B: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T]: the n_B[b] highest-confidence positions of each row (ties: the first).
    Every position is ranked, so no count has to come back from the device."""
    order_BT = conf_BT.sort(dim=-1, descending=True, stable=True).indices
    keep_BT = torch.arange(conf_BT.shape[1], device=conf_BT.device)[None, :] < n_B[:, None]
    return torch.zeros_like(conf_BT, dtype=torch.bool).scatter_(1, order_BT, keep_BT)
