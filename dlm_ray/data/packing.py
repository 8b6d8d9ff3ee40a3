"""Packing token streams into fixed-length rows: pure numpy, no Ray.

Documents are concatenated, each followed by EOS, and cut into ``seq_len`` rows. No token is
dropped: the last partial row is padded (attention_mask 0), and rows cut short for LLaDA's
random-length training hand their remaining tokens to the next row, so
``tokens in (documents + one EOS each) == sum(attention_mask)`` exactly. Every row gets a stable
``row_id`` from its work item's key and its index in that item, so packing never depends on
scheduling. With ``track_given`` each token also carries a ``given`` flag (a document's prompt that
the forward process must leave alone: conditional pretraining), cut and carried like the tokens.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from dlm_ray.data.hashing import stable_id


class Packer:
    """Cuts a stream of documents into fixed-length rows, carrying the remainder between calls."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int, *, key: str, random_length_fraction: float = 0.0,
                 seed: int = 0, track_given: bool = False) -> None:
        self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id
        self.key, self.fraction = key, random_length_fraction
        self.track_given = track_given
        self.tokens: list[np.ndarray] = []
        self.docs: list[np.ndarray] = []
        self.given: list[np.ndarray] = []
        self.num_docs = 0
        self.num_rows = 0
        self.rng = np.random.default_rng([seed, stable_id(key)])

    def add(self, docs: list[np.ndarray], given_lens: list[int] | None = None) -> None:
        """Append documents (token id arrays), each followed by EOS; with ``given_lens`` the first
        that many tokens of each document are flagged ``given``."""
        if not docs:
            return
        lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        flat = np.insert(np.concatenate(docs).astype(np.int32), np.cumsum(lens), self.eos_id)
        self.tokens.append(flat)
        self.docs.append(np.repeat(np.arange(self.num_docs, self.num_docs + len(docs), dtype=np.int32), lens + 1))
        if self.track_given:
            starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
            pos = np.arange(len(flat)) - np.repeat(starts, lens + 1)  # each token's place in its document
            keep = np.zeros(len(docs), dtype=np.int64) if given_lens is None else np.asarray(given_lens, dtype=np.int64)
            self.given.append((pos < np.repeat(keep, lens + 1)).astype(np.int8))
        self.num_docs += len(docs)

    def rows(self, *, final: bool = False) -> dict[str, np.ndarray] | None:
        """Every full row now available (and with ``final``, the padded tail)."""
        if not self.tokens:
            return None
        tokens, docs = np.concatenate(self.tokens), np.concatenate(self.docs)
        given = np.concatenate(self.given) if self.track_given else None
        L, n = self.seq_len, len(tokens)
        lengths, pos = [], 0
        while n - pos >= L or (final and pos < n):
            take = L
            if self.fraction and self.rng.random() < self.fraction:
                take = int(self.rng.integers(1, L))
            take = min(take, n - pos)
            lengths.append(take)
            pos += take
        self.tokens, self.docs = [tokens[pos:]], [docs[pos:]]
        if given is not None:
            self.given = [given[pos:]]
        if not lengths:
            return None
        R = len(lengths)
        ids = np.full((R, L), self.pad_id, dtype=np.int32)
        am = np.zeros((R, L), dtype=np.int8)
        doc = np.full((R, L), -1, dtype=np.int32)
        flags = np.zeros((R, L), dtype=np.int8)
        starts = np.cumsum([0, *lengths[:-1]])
        for r, (a, k) in enumerate(zip(starts, lengths)):
            ids[r, :k] = tokens[a:a + k]
            am[r, :k] = 1
            doc[r, :k] = docs[a:a + k] - docs[a]  # documents numbered from 0 within each row
            if given is not None:
                flags[r, :k] = given[a:a + k]
        index = np.arange(self.num_rows, self.num_rows + R, dtype=np.int64)
        row_ids = np.asarray([stable_id(self.key, int(i)) for i in index], dtype=np.int64)
        self.num_rows += R
        out = {"input_ids": ids, "attention_mask": am, "doc_ids": doc, "row_id": row_ids, "row_index": index}
        return {**out, "given": flags} if given is not None else out


def shuffle_in_windows(chunks: Iterator[dict[str, np.ndarray]], window: int, *,
                       key: tuple[Any, ...]) -> Iterator[dict[str, np.ndarray]]:
    """Rows of one work item, shuffled within consecutive windows of ``window`` rows.

    ``chunks`` yields rows in packing order with ``row_index`` starting at a multiple of ``window``.
    Each window is permuted by a function of ``key`` (seed, epoch, item) and its number alone, and
    its rows are renumbered in their new order: ``row_index`` then counts rows of the shuffled
    stream, so a data position in it ("every row before index k was consumed") stays exact and a
    resume that re-packs from the window's start finds the same order. Memory: one window.
    """
    held: list[dict[str, np.ndarray]] = []
    size = 0

    def emit(n: int) -> dict[str, np.ndarray]:
        nonlocal held, size
        rows = {k: np.concatenate([c[k] for c in held]) for k in held[0]}
        out, rest = {k: v[:n] for k, v in rows.items()}, {k: v[n:] for k, v in rows.items()}
        held, size = ([rest] if n < len(rows["row_index"]) else []), size - n
        first = int(out["row_index"][0])
        order = np.random.default_rng([stable_id(*key), first // window]).permutation(n)
        out = {k: v[order] for k, v in out.items()}
        out["row_index"] = np.arange(first, first + n, dtype=out["row_index"].dtype)
        return out

    for chunk in chunks:
        if len(chunk["row_index"]):
            held.append(chunk)
            size += len(chunk["row_index"])
        while size >= window:
            yield emit(window)
    if size:
        yield emit(size)
