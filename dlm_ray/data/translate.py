"""The ``translate`` family: word-level translation between two made-up languages.

Answers are long (40-80 characters, one byte token each with the byte tokenizer) and wholly
determined by the prompt, so most answer positions can be committed together once the prompt is
read: the family where decoding several tokens per model call pays. Getting one right still needs
the whole sentence, because the two languages order and mark words differently:

- the source language is subject-verb-object, an adjective follows its noun, a plural noun is
  followed by the particle ``ri``, a place is ``na`` + noun phrase after the object, and a time
  word (past, present, future) ends the sentence:
  ``<noun> [ri] <adj>* <verb> <noun> [ri] <adj>* [na <noun> [ri] <adj>*] <time>``;
- the target language is subject-(place)-object-verb, adjectives precede their noun in mirrored
  order, and every marker agrees with a word that comes later: the sentence opens with a tense
  particle (the source's last word), an adjective ends in ``i`` when its noun (after it) is
  plural, a plural noun ends in ``ir``, the place phrase ends in the postposition ``vu``, and the
  verb ends in ``ut`` when its object is plural:
  ``<tense> <adj>* <noun> [<adj>* <noun> vu] <adj>* <noun> <verb>``.

The lexicon (content words, a bijection from source to target) is generated from a fixed seed, so
it is the same on every machine and never changes with the corpus seed. ``translate_sentence`` is
the exact reference: a completion is valid when it equals it character for character.
"""

from __future__ import annotations

import random

LEXICON_SEED = 26
NUM_NOUNS, NUM_ADJECTIVES, NUM_VERBS = 30, 24, 20
ANSWER_CHARS = (40, 80)  # inclusive range of an answer's length; sentences outside it are redrawn
MAX_ADJECTIVES = 2  # per noun phrase

# Grammar words of each language; content words are CVC (source) or CVCVC (target), so neither
# kind can be mistaken for the other.
PLURAL, PLACE = "ri", "na"  # source particles
SOURCE_TIMES = ("pe", "su", "mo")  # past, present, future: the source sentence's last word
TARGET_TENSES = ("ka", "lo", "mi")  # the target sentence's first word, same order
POSTPOSITION = "vu"
ADJ_PLURAL, NOUN_PLURAL, VERB_PLURAL_OBJECT = "i", "ir", "ut"  # target suffixes


def _words(rng: random.Random, num: int, shape: str, taken: set[str]) -> list[str]:
    """``num`` distinct new words of ``shape`` (``C`` consonant, ``V`` vowel), none in ``taken``."""
    letters = {"C": "bdfgklmnprstvz", "V": "aeiou"}
    out: list[str] = []
    while len(out) < num:
        word = "".join(rng.choice(letters[c]) for c in shape)
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def _build_lexicon() -> dict[str, dict[str, str]]:
    """Per word class (``noun``, ``adj``, ``verb``), the source-to-target map."""
    rng = random.Random(LEXICON_SEED)
    taken = {PLURAL, PLACE, POSTPOSITION, *SOURCE_TIMES, *TARGET_TENSES}
    lexicon = {}
    for cls, num in (("noun", NUM_NOUNS), ("adj", NUM_ADJECTIVES), ("verb", NUM_VERBS)):
        lexicon[cls] = dict(zip(_words(rng, num, "CVC", taken), _words(rng, num, "CVCVC", taken)))
    return lexicon


LEXICON = _build_lexicon()
WORD_CLASS = {src: cls for cls, words in LEXICON.items() for src in words}  # source word -> class


# A parsed noun phrase: (noun, plural, adjectives in source order).
Phrase = tuple[str, bool, tuple[str, ...]]


def _target_phrase(phrase: Phrase) -> list[str]:
    noun, plural, adjs = phrase
    adj_end = ADJ_PLURAL if plural else ""
    return ([LEXICON["adj"][a] + adj_end for a in reversed(adjs)]
            + [LEXICON["noun"][noun] + (NOUN_PLURAL if plural else "")])


def _source_phrase(phrase: Phrase) -> list[str]:
    noun, plural, adjs = phrase
    return [noun, *([PLURAL] if plural else []), *adjs]


def _render(subj: Phrase, verb: str, obj: Phrase, place: Phrase | None, tense: int) -> tuple[str, str]:
    """(source sentence, target sentence) of one parsed sentence."""
    source = [*_source_phrase(subj), verb, *_source_phrase(obj)]
    target = [TARGET_TENSES[tense], *_target_phrase(subj)]
    if place is not None:
        source += [PLACE, *_source_phrase(place)]
        target += [*_target_phrase(place), POSTPOSITION]
    target += [*_target_phrase(obj), LEXICON["verb"][verb] + (VERB_PLURAL_OBJECT if obj[1] else "")]
    return " ".join([*source, SOURCE_TIMES[tense]]), " ".join(target)


def _draw_phrase(rng: random.Random) -> Phrase:
    adjs = tuple(rng.sample(sorted(LEXICON["adj"]), rng.randint(0, MAX_ADJECTIVES)))
    return rng.choice(sorted(LEXICON["noun"])), rng.random() < 0.5, adjs


def make_pair(rng: random.Random) -> tuple[str, str]:
    """A (source, target) sentence pair whose target is ``ANSWER_CHARS`` long; sentences of
    another length are redrawn from the same generator, so the pair is a function of its state."""
    while True:
        subj, obj = _draw_phrase(rng), _draw_phrase(rng)
        verb = rng.choice(sorted(LEXICON["verb"]))
        place = _draw_phrase(rng) if rng.random() < 0.6 else None
        source, target = _render(subj, verb, obj, place, rng.randrange(len(SOURCE_TIMES)))
        if ANSWER_CHARS[0] <= len(target) <= ANSWER_CHARS[1]:
            return source, target


def _parse_phrase(words: list[str], i: int) -> tuple[Phrase, int] | None:
    """The noun phrase starting at ``words[i]`` and the index after it; None if there is none."""
    if i >= len(words) or WORD_CLASS.get(words[i]) != "noun":
        return None
    noun, i = words[i], i + 1
    plural = i < len(words) and words[i] == PLURAL
    i += 1 if plural else 0
    adjs: list[str] = []
    while i < len(words) and WORD_CLASS.get(words[i]) == "adj":
        adjs.append(words[i])
        i += 1
    if len(adjs) > MAX_ADJECTIVES or len(set(adjs)) < len(adjs):
        return None
    return (noun, plural, tuple(adjs)), i


def translate_sentence(source: str) -> str | None:
    """The target-language translation of a source sentence the generator can produce, or None
    when ``source`` is not one (unknown word, wrong order, wrong spacing, answer out of range)."""
    words = source.split(" ")
    if not words or words[-1] not in SOURCE_TIMES:
        return None
    tense, words = SOURCE_TIMES.index(words[-1]), words[:-1]
    parsed = _parse_phrase(words, 0)
    if parsed is None or parsed[1] >= len(words) or WORD_CLASS.get(words[parsed[1]]) != "verb":
        return None
    subj, verb = parsed[0], words[parsed[1]]
    parsed = _parse_phrase(words, parsed[1] + 1)
    if parsed is None:
        return None
    obj, i = parsed
    place = None
    if i < len(words) and words[i] == PLACE:
        parsed = _parse_phrase(words, i + 1)
        if parsed is None:
            return None
        place, i = parsed
    if i != len(words):
        return None
    again, target = _render(subj, verb, obj, place, tense)
    if again != source or not ANSWER_CHARS[0] <= len(target) <= ANSWER_CHARS[1]:
        return None
    return target
