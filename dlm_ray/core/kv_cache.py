"""Keys/values kept for sampling, and the passes of a ``Denoiser`` that run against them.

A ``KVCache`` holds every layer's keys (after RoPE) and values in buffers of ``capacity`` slots,
allocated once for a whole canvas (prompt + answer: the sampler knows its length) and written in
place. The first ``length`` slots are filled; a pass over W new positions writes their keys/values
at [length, length + W) and attends to the slots up to there, so a step costs its own positions and
never a copy of what is cached. Positions and the padding mask are known for every slot up front
(the slots after the prompt are real and consecutive). For a model with ``shift_logits`` the cache
also keeps the final hidden states (a position's logits read the one before it). The key/value
heads are kept, never the copies grouped-query attention would repeat them into.

``forward_block`` (block-causal and causal models) denoises a block that follows everything in
the cache, exactly; with ``finished`` the same pass first feeds the finished block before it,
which joins the cache, so a block costs its decoding steps and nothing more. ``forward_window``
(full attention) recomputes a window of a whole canvas against its cached keys/values, which are
then approximate. The ``Denoiser`` methods of the same names call these.

Shape legend:  B batch, G key/value heads, C capacity (slots), K head dim, W new positions, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# A dlm_ray.core.model.Denoiser: not imported, since the model imports this module.
Denoiser = Any

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys (after RoPE) and values [B, G, C, K]


def _resized(t: torch.Tensor, dim: int, length: int, capacity: int) -> torch.Tensor:
    """A new buffer of ``capacity`` along ``dim`` holding ``t``'s first ``length`` entries (the rest
    is room, left unwritten)."""
    shape = list(t.shape)
    shape[dim] = capacity
    out = t.new_empty(shape)
    out.narrow(dim, 0, length).copy_(t.narrow(dim, 0, length))
    return out


@dataclass
class KVCache:
    """Every layer's keys/values, with each slot's position and padding mask; ``length`` slots are
    filled (all of them unless given), the rest is room to write into."""

    layers: list[LayerKV]
    pos_BL: torch.Tensor  # [B, C]
    keep_B11L: torch.Tensor | None  # [B, 1, 1, C] real slots; None: no padding
    hidden_BLD: torch.Tensor | None = None  # [B, C, D] final hidden states (shift_logits)
    length: int = -1

    def __post_init__(self) -> None:
        if self.length < 0:
            self.length = self.capacity

    @property
    def capacity(self) -> int:
        return self.pos_BL.shape[1]

    @classmethod
    def allocate(cls, layers: list[LayerKV], pos_BL: torch.Tensor, keep_B11L: torch.Tensor | None,
                 hidden_BLD: torch.Tensor | None, *, length: int, capacity: int) -> KVCache:
        """A cache of ``capacity`` slots holding the first ``length`` positions of a forward's
        keys/values (``layers``, [B, G, L, K]): the one copy a generation makes of them."""
        L = pos_BL.shape[1]
        if not 0 < length <= min(L, capacity):
            raise ValueError(f"cannot keep {length} of {L} positions in a cache of {capacity} slots")
        cache = cls([(_resized(k, 2, length, capacity), _resized(v, 2, length, capacity)) for k, v in layers],
                    pos_BL[:, :length], None if keep_B11L is None else keep_B11L[..., :length],
                    None if hidden_BLD is None else _resized(hidden_BLD, 1, length, capacity), length)
        cache._extend_slots(capacity)
        return cache

    def _extend_slots(self, capacity: int) -> None:
        """Positions and padding mask for slots up to ``capacity``: real, consecutive positions."""
        more = capacity - self.pos_BL.shape[1]
        if more <= 0:
            return
        step = torch.arange(1, more + 1, device=self.pos_BL.device)
        self.pos_BL = torch.cat([self.pos_BL, self.pos_BL[:, -1:] + step], 1)
        if self.keep_B11L is not None:
            self.keep_B11L = torch.cat([self.keep_B11L, self.keep_B11L.new_ones(*self.keep_B11L.shape[:3], more)], -1)

    def reserve(self, n: int) -> None:
        """Room for ``n`` slots after the filled ones: the buffers grow (doubling, one copy) only
        when a cache was made without room for them."""
        if self.length + n <= self.capacity:
            return
        capacity, L = max(self.length + n, 2 * self.capacity), self.length
        self.layers = [(_resized(k, 2, L, capacity), _resized(v, 2, L, capacity)) for k, v in self.layers]
        if self.hidden_BLD is not None:
            self.hidden_BLD = _resized(self.hidden_BLD, 1, L, capacity)
        self.pos_BL = self.pos_BL[:, :self.length]
        if self.keep_B11L is not None:
            self.keep_B11L = self.keep_B11L[..., :self.length]
        self._extend_slots(capacity)

    def rows(self, idx_A: torch.Tensor, room: int | None = None) -> KVCache:
        """A copy of the cache for a subset of the batch (rows that still have work), with every
        slot or, with ``room``, the filled slots and ``room`` more."""
        n = self.capacity if room is None else min(self.capacity, self.length + room)
        pick = lambda t: None if t is None else t[idx_A, ..., :n]  # noqa: E731
        return KVCache([(k[idx_A, :, :n], v[idx_A, :, :n]) for k, v in self.layers], self.pos_BL[idx_A, :n],
                       pick(self.keep_B11L), None if self.hidden_BLD is None else self.hidden_BLD[idx_A, :n],
                       self.length)


def forward_block(model: Denoiser, block_ids_BW: torch.Tensor, cache: KVCache, *, extend: bool = False,
                  logits_len: int | None = None, finished: int = 0) -> tuple[torch.Tensor, KVCache | None]:
    """Logits of the positions after ``cache``'s filled slots, written in place into its room.

    The W new positions start a block (blocks of the model's ``block_size``; of one position for a
    causal model) and see every cached key. ``finished`` > 0: the first ``finished`` positions
    are a finished block, whose keys/values join the cache, and the logits are those of the rest
    (the next block; shifted, its first logits read the finished block's last state from this
    same pass). ``extend``: every position joins the cache and every position gets logits. Returns
    the logits (of ``logits_len`` positions if given) and the cache (the same object) when it grew,
    else None. Exact: nothing before a block depends on it."""
    B, W = block_ids_BW.shape
    S = cache.length
    keep = W if extend else finished
    if not 0 <= finished < W:
        raise ValueError(f"finished={finished} must leave at least one of the {W} positions to predict")
    if S + W > model.max_seq_len:
        raise ValueError(f"sequence length {S + W} exceeds the model's context of {model.max_seq_len}")
    cache.reserve(W)
    cos, sin = model._rope(cache.pos_BL[:, S:S + W])
    attend = _new_block_mask(model, cache, W)
    x_BWD = model.wte(block_ids_BW)
    for block, kv in zip(model.blocks, cache.layers):
        x_BWD, _ = block(x_BWD, cos, sin, attend, kv, S, write=True)
    h_BWD = model.ln_f(x_BWD)
    a = 0 if extend else finished
    before = None if cache.hidden_BLD is None or S == 0 else cache.hidden_BLD[:, S - 1]
    n = W - a if logits_len is None else logits_len
    if not 0 <= n <= W - a:
        raise ValueError(f"logits_len={logits_len} must be within the {W - a} positions this pass predicts")
    logits = model.lm_head(model._head_input(h_BWD, a, a + n, before)).float() if n \
        else h_BWD.new_zeros(B, 0, model.config.vocab_size)
    if not keep:
        return logits, None
    if cache.hidden_BLD is not None:
        cache.hidden_BLD[:, S:S + keep] = h_BWD[:, :keep]
    cache.length = S + keep
    return logits, cache


def _new_block_mask(model: Denoiser, cache: KVCache, W: int) -> torch.Tensor | None:
    """Which of the S + W keys each new position sees: [B or 1, 1, W, S + W], or None for all.
    Every real cached key; of the new ones, those of its own block and the blocks before it."""
    S, size = cache.length, model.attention_block
    keep_B11S = None if cache.keep_B11L is None else cache.keep_B11L[..., :S + W]
    if W <= size:  # one block: the new positions see each other
        return keep_B11S
    blk = torch.div(torch.arange(W, device=cache.pos_BL.device), size, rounding_mode="floor")
    new_11WW = (blk[None, :] <= blk[:, None])[None, None]
    old_B1WS = torch.ones(1, 1, W, S, dtype=torch.bool, device=new_11WW.device) if keep_B11S is None \
        else keep_B11S[..., :S].expand(-1, -1, W, -1)
    return torch.cat([old_B1WS, new_11WW.expand(old_B1WS.shape[0], -1, -1, -1)], -1)


def forward_window(model: Denoiser, window_ids_BW: torch.Tensor, start: int, cache: KVCache, *,
                   logits_len: int | None = None) -> torch.Tensor:
    """Logits of the window [start, start + W) of the canvas ``cache`` was made from, with the
    window's tokens replaced by ``window_ids_BW``; every other position's keys/values come from
    the cache (approximate: they are not updated for the window's new tokens), which is left as it
    was. With ``logits_len`` only the window's first ``logits_len`` positions get logits."""
    if cache.length != cache.capacity:
        raise ValueError("forward_window needs the cache of a whole canvas (prefill without capacity)")
    W = window_ids_BW.shape[1]
    cos, sin = model._rope(cache.pos_BL[:, start:start + W])
    x_BWD = model.wte(window_ids_BW)
    for block, kv in zip(model.blocks, cache.layers):
        x_BWD, _ = block(x_BWD, cos, sin, cache.keep_B11L, kv, start)
    # Shifted, the window's first logits read the cached state before it (as stale as its keys).
    before = None if cache.hidden_BLD is None or start == 0 else cache.hidden_BLD[:, start - 1]
    return model.lm_head(model._head_input(model.ln_f(x_BWD), 0, logits_len or W, before)).float()


def block_step(model: Denoiser, xa_AT: torch.Tensor, ama_AT: torch.Tensor | None, cache: KVCache | None,
               cache_rows_H: torch.Tensor | None, rows_H: torch.Tensor, P: int, start: int, end: int, gen_end: int,
               *, first: bool) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
    """One step of the block sampler (cache="blocks") on the canvas rows at work ``xa_AT`` (their
    indices ``rows_H``, on the host): the block [start, end)'s logits, exact; the cache and the
    rows it holds (``cache_rows_H``).

    The first call runs the prompt and the first block together (the prompt joins the cache, sized
    for the canvas up to ``gen_end``); the first step of every later block also feeds the block
    before it, which is final, so it joins the cache in that pass. A row with no mask when a block
    starts has none after it either (it stopped at its end token), so the cache drops it for good;
    rows that finish a block early skip its later steps, run against a copy of the cache."""
    W = end - start
    if cache is None or cache_rows_H is None:
        am = None if ama_AT is None else ama_AT[:, :end]
        logits_ALV, cache = model.prefill(xa_AT[:, :end], am, block_start=P, logits_span=(start, end),
                                          capacity=gen_end, cached=P)
        assert cache is not None
        return logits_ALV, cache, rows_H
    same = torch.equal(cache_rows_H, rows_H)
    idx_A = None if same else torch.searchsorted(cache_rows_H, rows_H).to(xa_AT.device)
    if first:
        if idx_A is not None:
            cache, cache_rows_H = cache.rows(idx_A), rows_H
        logits_ALV, _ = model.forward_block(xa_AT[:, start - W:end], cache, finished=W)
        return logits_ALV, cache, cache_rows_H
    logits_ALV, _ = model.forward_block(xa_AT[:, start:end], cache if idx_A is None else cache.rows(idx_A, room=W))
    return logits_ALV, cache, cache_rows_H
