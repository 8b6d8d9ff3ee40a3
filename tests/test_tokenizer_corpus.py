"""Tokenizers (built-in bytes, a tokenizer.json made here) and the corpus with its checker."""

from __future__ import annotations

import random

import pytest

from dlm_ray.data.corpus import (
    FAMILIES, check_answer, check_document, is_heldout, take_examples,
)
from dlm_ray.core.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert len({tok.pad_id, tok.eos_id, tok.mask_id}) == 3 and tok.vocab_size == 259


def test_decoding_drops_no_token():
    tok = ByteTokenizer()
    # Special ids are written out, never dropped; an id outside the vocabulary is an error.
    assert tok.decode([104, 105, tok.pad_id, 33]) == "hi<|pad|>!"
    with pytest.raises(ValueError, match="outside the byte tokenizer's vocabulary"):
        tok.decode([104, 260])


def _make_tokenizer_json(path, with_specials: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "[PAD]", "[MASK]", "</s>"] if with_specials else ["[UNK]"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(str(path))


@pytest.mark.parametrize("with_specials", [True, False])
def test_hf_tokenizer_guarantees_specials(tmp_path, with_specials):
    path = tmp_path / "tokenizer.json"
    _make_tokenizer_json(path, with_specials)
    tok = load_tokenizer(str(tmp_path))  # a directory works as well as the file
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("the lazy fox")
    assert tok.mask_id not in ids and tok.decode(ids).replace(" ", "") == "thelazyfox"
    assert len({tok.pad_id, tok.eos_id, tok.mask_id}) == 3 and tok.vocab_size > max(ids)
    if with_specials:  # existing tokens are reused, not duplicated
        assert tok._tok.token_to_id("[MASK]") == tok.mask_id
    again = load_tokenizer(tok.to_config())
    assert again.mask_id == tok.mask_id and again.encode("the lazy fox") == ids


@pytest.mark.parametrize("with_specials", [True, False])
def test_text_never_becomes_the_mask_or_pad_token(tmp_path, with_specials):
    path = tmp_path / "tokenizer.json"
    _make_tokenizer_json(path, with_specials)
    tok = load_tokenizer(str(path))
    mask_text, pad_text = tok._tok.id_to_token(tok.mask_id), tok._tok.id_to_token(tok.pad_id)
    for text in (f"the {mask_text} fox", f"{pad_text}{mask_text}", "<|mdm_mask|> [MASK] <mask>"):
        ids = tok.encode(text)
        assert tok.mask_id not in ids and tok.pad_id not in ids, (text, ids)
        batch = tok.encode_batch([text])[0].tolist()
        assert batch == ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size + 3])


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checker_accepts_generated_and_rejects_corrupted(family):
    rng = random.Random(0)
    for _ in range(200):
        ex = FAMILIES[family](rng)
        assert check_answer(ex.prompt, ex.answer) and check_document(ex.text) == (family, True)
        # Any single-character change of the answer, or a dropped character, is rejected
        # (for Sudoku only where the cell is not a free choice among valid grids).
        i = rng.randrange(len(ex.answer))
        wrong = ex.answer[:i] + ("0" if ex.answer[i] != "0" else "1") + ex.answer[i + 1:]
        assert not check_answer(ex.prompt, wrong)
        assert not check_answer(ex.prompt, ex.answer[:-1])


def test_sudoku_checker_enforces_givens_and_boxes():
    assert check_answer("q1...............=", "1234341221434321")
    assert not check_answer("q2...............=", "1234341221434321")  # contradicts a given
    assert not check_answer("q................=", "1234123412341234")  # columns repeat
    assert not check_answer("q................=", "1234214334124321")  # rows and columns fine, a box repeats


def test_splits_are_disjoint_and_deterministic():
    fams = {"sort": 1.0, "reverse": 1.0, "sudoku": 1.0}
    train = take_examples(fams, 3000, seed=1)
    held = take_examples(fams, 300, seed=1, split="heldout")
    assert not {e.text for e in train} & {e.text for e in held}
    assert all(is_heldout(e.text) for e in held)
    assert take_examples(fams, 50, seed=1) == train[:50]
    assert {e.family for e in train} == set(fams)
