"""The built-in corpus: structured task families with an exact checker, offline and deterministic.

Each document is ``prompt + answer`` in plain ASCII, short enough for the byte tokenizer, and the
checker decides exactly whether a document (or an answer to a given prompt) is valid, so sample
quality is a number. Families, by difficulty:

- ``reverse``: ``r472190=091274``: the digits reversed (local, position-to-position copying);
- ``sort``: ``s931420=012349``: the digits sorted (needs the whole multiset, still learnable on a CPU);
- ``sudoku``: ``q1...32....23.3..=1432...``: a 4x4 Sudoku (2x2 boxes) with blanks as ``.``, answered
  by the full solved grid. Every cell constrains others across the grid: correctness needs global
  context, the kind of task where diffusion models are reported to beat autoregressive ones;
- ``translate``: ``tdaf ri suv mok ... mo=mi zisopi ...``: word-level translation between two
  made-up languages with reordering and agreement (``dlm_ray.data.translate``): answers of 40-80
  characters, each determined by the prompt, long enough for parallel decoding to matter.

The held-out split is defined by content (a hash of the document), so train and held-out never
share a document however many are drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator

from dlm_ray.config.schema import CORPUS_FAMILIES
from dlm_ray.data.hashing import hash64
from dlm_ray.data.translate import ANSWER_CHARS, make_pair, translate_sentence

NUM_DIGITS = (6, 6)  # inclusive range of list lengths for reverse/sort
SUDOKU_GIVENS = 6
HELDOUT_MODULUS = 10  # one document in ten is held out
# The draw of held-out prompts that evaluation, the batch job's ``builtin:N`` and the benchmarks share.
HELDOUT_SEED = 12345


@dataclass(frozen=True)
class Example:
    family: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(*NUM_DIGITS)))


def make_reverse(rng: random.Random) -> Example:
    d = _digits(rng)
    return Example("reverse", f"r{d}=", d[::-1])


def make_sort(rng: random.Random) -> Example:
    d = _digits(rng)
    return Example("sort", f"s{d}=", "".join(sorted(d)))


def _random_grid(rng: random.Random) -> list[list[int]]:
    """A uniformly relabelled, row/column-shuffled valid 4x4 Sudoku grid."""
    grid = [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]
    rows = [b * 2 + r for b in rng.sample([0, 1], 2) for r in rng.sample([0, 1], 2)]
    cols = [b * 2 + c for b in rng.sample([0, 1], 2) for c in rng.sample([0, 1], 2)]
    grid = [[grid[r][c] for c in cols] for r in rows]
    if rng.random() < 0.5:
        grid = [list(col) for col in zip(*grid)]
    relabel = dict(zip([1, 2, 3, 4], rng.sample([1, 2, 3, 4], 4)))
    return [[relabel[v] for v in row] for row in grid]


def make_sudoku(rng: random.Random) -> Example:
    cells = [v for row in _random_grid(rng) for v in row]
    givens = set(rng.sample(range(16), SUDOKU_GIVENS))
    puzzle = "".join(str(v) if i in givens else "." for i, v in enumerate(cells))
    return Example("sudoku", f"q{puzzle}=", "".join(map(str, cells)))


def make_translate(rng: random.Random) -> Example:
    source, target = make_pair(rng)
    return Example("translate", f"t{source}=", target)


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "reverse": make_reverse,
    "sort": make_sort,
    "sudoku": make_sudoku,
    "translate": make_translate,
}
PREFIX_TO_FAMILY = {"r": "reverse", "s": "sort", "q": "sudoku", "t": "translate"}
# The longest answer of each family, in characters (one token each with the byte tokenizer):
# what a sampler's gen_length must hold, with the EOS after it, to be able to answer.
MAX_ANSWER_CHARS = {"reverse": NUM_DIGITS[1], "sort": NUM_DIGITS[1], "sudoku": 16, "translate": ANSWER_CHARS[1]}
assert tuple(FAMILIES) == CORPUS_FAMILIES, "the config's list of families is this module's"


# ------------------------------------------------------------------------------------------ checker


def _valid_sudoku(grid: str) -> bool:
    if len(grid) != 16 or set(grid) - set("1234"):
        return False
    g = [grid[i * 4 : i * 4 + 4] for i in range(4)]
    units = [set(row) for row in g] + [{g[r][c] for r in range(4)} for c in range(4)]
    units += [{g[r][c] for r in (br, br + 1) for c in (bc, bc + 1)} for br in (0, 2) for bc in (0, 2)]
    return all(len(u) == 4 for u in units)


def check_answer(prompt: str, answer: str) -> bool:
    """Is ``answer`` a correct completion of ``prompt``? Exact, no partial credit."""
    family = PREFIX_TO_FAMILY.get(prompt[:1])
    if family is None or not prompt.endswith("="):
        return False
    body = prompt[1:-1]
    if family == "translate":
        target = translate_sentence(body)
        return target is not None and answer == target
    if family in ("reverse", "sort"):
        if not (NUM_DIGITS[0] <= len(body) <= NUM_DIGITS[1]) or not body.isdigit():
            return False
        return answer == (body[::-1] if family == "reverse" else "".join(sorted(body)))
    if len(body) != 16 or set(body) - set("1234."):
        return False
    agrees = all(p == "." or p == a for p, a in zip(body, answer))
    return agrees and _valid_sudoku(answer)


def prompt_length(text: str) -> int:
    """Characters of a document's prompt (through its ``=``), the part sampling is given; 0 for a
    text that is not a built-in document."""
    return text.index("=") + 1 if text[:1] in PREFIX_TO_FAMILY and "=" in text else 0


def check_document(text: str) -> tuple[str | None, bool]:
    """(family or None, valid) for a whole document such as an unconditional sample."""
    family = PREFIX_TO_FAMILY.get(text[:1])
    if family is None or "=" not in text:
        return family, False
    prompt, _, answer = text.partition("=")
    return family, check_answer(prompt + "=", answer)


# ------------------------------------------------------------------------------------------- corpus


def is_heldout(text: str) -> bool:
    """The built-in corpus's content-hash split. One in ``HELDOUT_MODULUS`` by the hash's remainder,
    where a file corpus (``sources.in_val``) compares the same hash with a fraction: the two rules
    pick different documents, and each split must stay the one its runs were trained and scored on."""
    return hash64(text) % HELDOUT_MODULUS == 0


def example_at(families: dict[str, float], index: int, *, seed: int, family: str | None = None) -> Example:
    """The ``index``-th draw of the stream: each index has its own RNG, so any worker can make any
    range of documents without the ones before it."""
    names = [family] if family is not None else sorted(families)
    rng = random.Random(f"{seed}:{family}:{index}")
    return FAMILIES[rng.choices(names, [families.get(n, 1.0) for n in names])[0]](rng)


def iter_examples(
    families: dict[str, float], *, seed: int, split: str = "train", family: str | None = None, start: int = 0
) -> Iterator[tuple[int, Example]]:
    """(index, example) pairs of one split (``train`` or ``heldout``), from draw ``start`` on.

    Families are drawn by weight unless ``family`` pins one. The same arguments always give the
    same stream; draws that belong to the other split are passed over.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    want_heldout = split == "heldout"
    index = start
    while True:
        ex = example_at(families, index, seed=seed, family=family)
        if is_heldout(ex.text) == want_heldout:
            yield index, ex
        index += 1


def take_examples(families: dict[str, float], num: int, *, seed: int, split: str = "train",
                  family: str | None = None) -> list[Example]:
    stream = iter_examples(families, seed=seed, split=split, family=family)
    return [next(stream)[1] for _ in range(num)]
