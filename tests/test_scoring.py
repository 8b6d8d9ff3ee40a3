"""Held-out scoring on the built-in corpus: every token of the held-out documents is scored, packed
as training packs them, the padded last row through its attention mask and for the tokens it holds."""

from __future__ import annotations

import math

import pytest
import torch

from dlm_ray.config.schema import CorpusConfig
from dlm_ray.core.tokenizer import ByteTokenizer
from dlm_ray.data.corpus import HELDOUT_SEED, take_examples
from dlm_ray.eval.scoring import corpus_rows, heldout_bits_per_token

NUM_DOCS, SEQ_LEN = 7, 32


def stream(tok: ByteTokenizer, families: dict[str, float]) -> list[int]:
    """The held-out documents as one token stream, each followed by EOS."""
    docs = take_examples(families, NUM_DOCS, seed=HELDOUT_SEED, split="heldout")
    return [t for d in docs for t in (*tok.encode(d.text), tok.eos_id)]


class TwoKnowledgeModel:
    """Logits that do not look at the canvas: uniform over every predictable token (log(V - 1) nats a
    token) in a row without padding, uniform over the corpus's own tokens (log(len(alphabet)) nats)
    in a padded row. Either way every token of a row costs the same, so the NELBO estimate is exact
    whatever the draws; and a pad token scored as if real would cost infinitely much."""

    def __init__(self, vocab_size: int, alphabet: set[int]) -> None:
        self.vocab_size = vocab_size
        self.narrow_V = torch.full((vocab_size,), -math.inf)
        self.narrow_V[sorted(alphabet)] = 0.0

    def __call__(self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        B, L = input_ids_BL.shape
        logits_BLV = torch.zeros(B, L, self.vocab_size)
        if attention_mask_BL is not None:
            padded_B = (attention_mask_BL == 0).any(-1)
            logits_BLV[padded_B] = self.narrow_V
        return logits_BLV


def test_rows_hold_every_token_of_the_held_out_documents():
    tok = ByteTokenizer()
    families = CorpusConfig().families
    tokens = stream(tok, families)
    rows = corpus_rows(tok, families, NUM_DOCS, SEQ_LEN, seed=HELDOUT_SEED, split="heldout")
    real = rows["attention_mask"].astype(bool)
    assert len(tokens) % SEQ_LEN, "the documents must not fill whole rows, or nothing is padded"
    assert rows["input_ids"][real].tolist() == tokens
    assert rows["input_ids"].shape == (-(-len(tokens) // SEQ_LEN), SEQ_LEN)
    assert (rows["input_ids"][~real] == tok.pad_id).all()


@pytest.mark.parametrize("batch_size", [64, 2])
def test_held_out_bits_score_every_token_and_weigh_the_padded_row_by_its_tokens(batch_size):
    tok = ByteTokenizer()
    families = CorpusConfig().families
    tokens = stream(tok, families)
    num_full, num_tail = divmod(len(tokens), SEQ_LEN)
    assert num_full >= 1 and num_tail >= 1
    model = TwoKnowledgeModel(tok.vocab_size, set(tokens))
    bits = heldout_bits_per_token(model, tok, families, num_docs=NUM_DOCS, seq_len=SEQ_LEN, num_samples=3,
                                  batch_size=batch_size)
    wide, narrow = math.log(tok.vocab_size - 1), math.log(len(set(tokens)))
    expected_nats = (num_full * SEQ_LEN * wide + num_tail * narrow) / len(tokens)
    assert bits == pytest.approx(expected_nats / math.log(2), rel=1e-6)
    # Not a mean over rows (the padded row counting as much as a full one) and not full rows only.
    assert bits != pytest.approx((num_full * wide + narrow) / (num_full + 1) / math.log(2), rel=1e-6)
    assert bits != pytest.approx(wide / math.log(2), rel=1e-6)


def test_too_few_documents_is_an_error_not_an_empty_mean():
    with pytest.raises(ValueError, match="num_docs"):
        corpus_rows(ByteTokenizer(), CorpusConfig().families, 0, SEQ_LEN, seed=HELDOUT_SEED, split="heldout")


def test_a_few_documents_shorter_than_a_row_still_score():
    tok = ByteTokenizer()
    bits = heldout_bits_per_token(lambda x, am=None: torch.zeros(*x.shape, tok.vocab_size), tok,
                                  CorpusConfig().families, num_docs=1, seq_len=256, num_samples=2)
    assert bits == pytest.approx(math.log2(tok.vocab_size - 1), rel=1e-6)
