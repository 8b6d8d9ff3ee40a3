"""Stable hashes of text: the content-hash held-out splits, packed rows' ids, batch rows' seeds.

Every one is ``hash64``: blake2b (8 bytes) of the text's UTF-8 bytes, read as a little-endian
integer, the same on every machine, process and Python version (``hash()`` is salted per process).
What these numbers decide is stored: which side of the train / held-out split a document is on,
the ``row_id`` of a packed row a resume position counts, the seed a batch row was generated with.
So the text each caller hashes and the rule it applies to the number are part of the data's
meaning; a change moves documents between train and held-out or gives a resumed job other rows.
The callers and their rules:

    corpus.is_heldout     hash64(document) % 10 == 0         the built-in corpus's held-out tenth
    sources.in_val        hash64(document) / 2**64 < f       a file corpus's held-out fraction f
    stable_id(*parts)     hash64("\\x1f".join(parts)) >> 1    row ids, item ids, shuffle keys
    prompts.row_seed      hash64(f"{seed}:{id}") >> 1        a batch row's seed when it brings none
"""

from __future__ import annotations

import hashlib
from typing import Any

# Joins the parts of a stable_id: a character no key or path holds, so ("a:b", 1) and ("a", "b:1") differ.
PART_SEPARATOR = "\x1f"


def hash64(text: str) -> int:
    """The unsigned 64-bit hash of ``text``'s UTF-8 bytes. A lone surrogate (a file name or line that
    was not valid UTF-8) is hashed as its bytes, not refused: every text has a hash."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def stable_id(*parts: Any) -> int:
    """A 63-bit id (it fits an int64 column) from the parts' text: the same on every machine and run."""
    return hash64(PART_SEPARATOR.join(map(str, parts))) >> 1
