"""The ``translate`` family: lexicon, grammar, lengths, split, and an exact checker that refuses
each kind of mistake (a wrong word, a wrong order, a wrong agreement marker, a cut-off answer)."""

from __future__ import annotations

import hashlib

import random

import pytest

from dlm_ray.config.schema import SampleConfig
from dlm_ray.core.tokenizer import ByteTokenizer
from dlm_ray.data import translate as tr
from dlm_ray.data.corpus import MAX_ANSWER_CHARS, check_answer, check_document, is_heldout, take_examples
from dlm_ray.eval.scoring import sample_for_family

FAM = {"translate": 1.0}


def examples(num: int = 300, seed: int = 0):
    return take_examples(FAM, num, seed=seed)


def test_lexicon_is_a_bijection_between_disjoint_vocabularies():
    grammar = {tr.PLURAL, tr.PLACE, tr.POSTPOSITION, *tr.SOURCE_TIMES, *tr.TARGET_TENSES}
    sources = [s for words in tr.LEXICON.values() for s in words]
    targets = [t for words in tr.LEXICON.values() for t in words.values()]
    assert len(sources) == len(set(sources)) == len(targets) == len(set(targets))
    assert 60 <= len(sources) <= 100
    assert not set(sources) & set(targets) and not (set(sources) | set(targets)) & grammar
    assert tr._build_lexicon() == tr.LEXICON  # from its fixed seed, not from any run's


def test_answers_are_40_to_80_byte_tokens_and_the_reference_is_accepted():
    tok = ByteTokenizer()
    lengths = []
    for ex in examples():
        assert ex.prompt.startswith("t") and ex.prompt.endswith("=")
        assert check_answer(ex.prompt, ex.answer) and check_document(ex.text) == ("translate", True)
        lengths.append(len(tok.encode(ex.answer)))
    assert 40 <= min(lengths) and max(lengths) <= 80 == MAX_ANSWER_CHARS["translate"]
    assert max(lengths) - min(lengths) >= 25  # a spread of sentence shapes, not one length


def test_the_grammar_on_a_sentence_written_out():
    lex = tr.LEXICON
    (n1, n2, n3), (a1, a2, a3), verb = sorted(lex["noun"])[:3], sorted(lex["adj"])[:3], sorted(lex["verb"])[0]
    source = f"{n1} ri {a1} {a2} {verb} {n2} {a3} na {n3} ri {tr.SOURCE_TIMES[2]}"
    tgt = {w: t for words in lex.values() for w, t in words.items()}
    want = (f"{tr.TARGET_TENSES[2]} {tgt[a2]}i {tgt[a1]}i {tgt[n1]}ir {tgt[n3]}ir {tr.POSTPOSITION} "
            f"{tgt[a3]} {tgt[n2]} {tgt[verb]}")
    assert tr.translate_sentence(source) == want
    # The object's number moves to the verb, at the other end of the target sentence.
    plural_obj = source.replace(f"{n2} {a3}", f"{n2} ri {a3}")
    assert tr.translate_sentence(plural_obj) == want.replace(f"{tgt[a3]} {tgt[n2]} {tgt[verb]}",
                                                             f"{tgt[a3]}i {tgt[n2]}ir {tgt[verb]}ut")


def _corruptions(prompt: str, answer: str, rng: random.Random) -> dict[str, str]:
    """One answer per kind of mistake, each a plausible near-miss."""
    words = answer.split(" ")
    targets = {t: cls for cls, ws in tr.LEXICON.items() for t in ws.values()}
    out = {}
    # A wrong content word: another word of the same class, markers kept.
    i = next(j for j, w in enumerate(words) if any(w.startswith(t) for t in targets))
    stem = next(t for t in targets if words[i].startswith(t))
    other = rng.choice([t for t, c in targets.items() if c == targets[stem] and t != stem])
    out["word"] = " ".join(words[:i] + [other + words[i][len(stem):]] + words[i + 1:])
    # A wrong order: the verb (last) moved before the object, as the source orders it.
    out["order"] = " ".join(words[:-2] + [words[-1], words[-2]])
    # A wrong tense particle (the agreement with the source's last word).
    out["tense"] = " ".join([rng.choice([t for t in tr.TARGET_TENSES if t != words[0]])] + words[1:])
    # A wrong number marker on the verb (agreeing with the object before it).
    verb = words[-1]
    out["agreement"] = " ".join(words[:-1] + [verb[:-2] if verb.endswith(tr.VERB_PLURAL_OBJECT) and verb[:-2] in
                                               targets else verb + tr.VERB_PLURAL_OBJECT])
    # A wrong number marker on an adjective (agreeing with its noun, which follows it).
    j = next((j for j, w in enumerate(words) if targets.get(w.removesuffix(tr.ADJ_PLURAL)) == "adj"), None)
    if j is not None:
        adj = words[j]
        flipped = adj.removesuffix(tr.ADJ_PLURAL) if adj[:-1] in targets else adj + tr.ADJ_PLURAL
        out["adjective agreement"] = " ".join(words[:j] + [flipped] + words[j + 1:])
    # Truncated: the last word cut, or the last character; a trailing space.
    out["truncated word"] = " ".join(words[:-1])
    out["truncated char"] = answer[:-1]
    out["extra space"] = answer + " "
    return out


def test_checker_rejects_each_kind_of_mistake():
    rng = random.Random(1)
    for ex in examples(200):
        for kind, wrong in _corruptions(ex.prompt, ex.answer, rng).items():
            assert wrong != ex.answer and not check_answer(ex.prompt, wrong), (kind, ex.prompt, wrong)


def test_checker_refuses_prompts_the_generator_cannot_make():
    ex = examples(1)[0]
    body = ex.prompt[1:-1]
    words = body.split(" ")
    verb = next(i for i, w in enumerate(words) if tr.WORD_CLASS.get(w) == "verb")
    bad_prompts = {
        "unknown word": " ".join(["zzz", *words[1:]]),
        "no time word": " ".join(words[:-1]),
        "verb first": " ".join([words[verb], *words[:verb], *words[verb + 1:]]),
        "double space": body.replace(" ", "  ", 1),
        "empty": "",
    }
    for kind, bad in bad_prompts.items():
        assert tr.translate_sentence(bad) is None, kind
        assert not check_answer(f"t{bad}=", ex.answer), kind
    # A sentence whose translation would fall outside the answer range is not a prompt of the family.
    noun, verb = sorted(tr.LEXICON["noun"])[0], sorted(tr.LEXICON["verb"])[0]
    short = f"{noun} {verb} {noun} {tr.SOURCE_TIMES[0]}"
    assert tr.translate_sentence(short) is None


def test_split_is_disjoint_and_generation_deterministic_per_seed():
    train = examples(2000, seed=3)
    held = take_examples(FAM, 200, seed=3, split="heldout")
    assert not {e.text for e in train} & {e.text for e in held}
    assert all(is_heldout(e.text) for e in held) and not any(is_heldout(e.text) for e in train)
    assert examples(50, seed=3) == train[:50]
    assert examples(50, seed=4) != train[:50]
    # Adding the family to the set changes nothing of the default mix's stream: its first 500
    # documents hash as they did before the family existed (runs trained on it stay reproducible).
    mix = {"reverse": 0.3, "sort": 0.4, "sudoku": 0.3}
    stream = "\n".join(e.text for e in take_examples(mix, 500, seed=0))
    assert hashlib.sha256(stream.encode()).hexdigest()[:16] == "8365f0be82ad691e"


@pytest.mark.parametrize("cfg", [SampleConfig(gen_length=24, steps=24, block_length=24),
                                 SampleConfig(gen_length=32, steps=16, block_length=8)])
def test_sampler_is_lengthened_to_hold_the_longest_answer(cfg):
    long = sample_for_family(cfg, "translate")
    assert long.gen_length >= MAX_ANSWER_CHARS["translate"] + 1  # the answer and its EOS
    assert long.num_blocks == cfg.num_blocks and long.gen_length * cfg.steps == long.steps * cfg.gen_length
    assert sample_for_family(cfg, "reverse") == cfg  # families that fit are sampled as configured
