"""Detection as phrase grounding (GLIP): prompts built from class names or captions, each phrase's character spans,
and the positive map from spans to tokens (microsoft/GLIP: `od_to_grounding.py`, `engine/inference.py`,
`predictor_glip.py`).

A class vocabulary becomes the caption "heart. red star. bar" (names joined by ". ", no trailing separator); a long
vocabulary is cut into several such prompts (GLIP evaluates LVIS 40 names at a time). Training prompts shuffle
the positive classes with sampled negatives up to the token budget. A free caption's phrases come from a noun-phrase
chunker, or are given.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..text.prompts import GroundingPrompt, Span

SEPARATOR = ". "


def clean_name(name: str) -> str:
    """GLIP's `clean_name`: parenthesised parts removed, '_' -> ' ', double spaces made single
    ('bow_(weapon)' -> 'bow ')."""
    return re.sub(r"\(.*\)", "", name).replace("_", " ").replace("  ", " ")


def class_prompt(names: list[str], separator: str = SEPARATOR) -> GroundingPrompt:
    """Class names -> the caption 'name1. name2. name3' with each (cleaned) name's span."""
    caption, spans = "", []
    for i, name in enumerate(names):
        if i:
            caption += separator
        cleaned = clean_name(name)
        spans.append([(len(caption), len(caption) + len(cleaned))])
        caption += cleaned
    return GroundingPrompt(caption, list(names), spans)


def chunk_classes(names: list[str], count_tokens: Callable[[str], int], max_tokens: int, chunk_size: int = 40,
                  separator: str = SEPARATOR) -> list[list[int]]:
    """Consecutive groups of class indices whose prompt ('a. b. c', as `class_prompt` joins them) has at most
    `chunk_size` names and fits in `max_tokens` (special tokens included): each prompt is as full as the text encoder
    allows. count_tokens(text) counts a text's tokens without the special ones."""
    between = count_tokens(separator)
    chunks, current, used = [], [], 2
    for k, name in enumerate(names):
        cost = count_tokens(clean_name(name))
        if cost + 2 > max_tokens:
            raise InputError(f"the class name {name!r} alone takes {cost} tokens; the text encoder takes "
                             f"{max_tokens - 2}: shorten it")
        if current and (len(current) == chunk_size or used + between + cost > max_tokens):
            chunks.append(current)
            current, used = [], 2
        used += cost + (between if current else 0)
        current.append(k)
    return chunks + ([current] if current else [])


def training_prompt(positives: list[str], pool: list[str], count_tokens: Callable[[str], int], max_tokens: int,
                    rng: np.random.Generator, negatives: int = 85, full_probability: float = 0.5,
                    separator: str = SEPARATOR) -> GroundingPrompt:
    """GLIP's detection-to-grounding prompt for training (`convert_object_detection_to_grounding_optimized_for_od`).

    positives: the classes with boxes in the image (each once); pool: every class name. The positives are shuffled
    and kept while their tokens fit (`check_for_positive_overflow`); with probability `full_probability`
    `negatives` names are drawn from the pool, else a uniform 1..`negatives`; those that are positives are dropped
    and the rest kept while the budget lasts; all are shuffled into one caption. Phrases are the class names;
    a positive whose tokens did not fit is absent (its boxes must be dropped).
    """
    budget = max_tokens - 2
    kept, used = [], 0
    for i in rng.permutation(len(positives)):
        cost = count_tokens(clean_name(positives[i]) + separator)
        if used + cost > budget:
            break
        kept.append(positives[i])
        used += cost
    wanted = negatives if rng.random() < full_probability else int(rng.integers(negatives)) + 1
    drawn = rng.choice(len(pool), size=min(wanted, len(pool)), replace=False)
    chosen, left = [], budget - used
    for i in drawn:
        name = pool[i]
        if name in positives:
            continue
        left -= count_tokens(clean_name(name) + separator)
        if left <= 0:
            break
        chosen.append(name)
    names = kept + chosen
    return class_prompt([names[i] for i in rng.permutation(len(names))], separator)


def split_phrases(text: str) -> list[str]:
    """'red star; blue circle' -> ['red star', 'blue circle'] (empty pieces dropped)."""
    return [p.strip() for p in text.split(";") if p.strip()]


def caption_prompt(caption: str, phrases: list[str] | None = None, chunker: str = "auto") -> GroundingPrompt:
    """A free caption and its phrases: `phrases` given (each found in the caption, case-insensitively, every
    occurrence) or the noun phrases of a chunker (see `noun_phrase_spans`)."""
    if not caption.strip():
        raise InputError("the caption is empty")
    if phrases is None:
        spans = noun_phrase_spans(caption, chunker)
        return GroundingPrompt(caption, [caption[s:e] for s, e in spans], [[span] for span in spans])
    out = GroundingPrompt(caption, [], [])
    for phrase in dict.fromkeys(p.strip() for p in phrases):  # spans index the caption as given (no lower())
        found = [m.span() for m in re.finditer(re.escape(phrase), caption, re.IGNORECASE)] if phrase else []
        if not found:
            raise InputError(f"the phrase {phrase!r} is not in the caption {caption!r}")
        out.phrases.append(phrase)
        out.spans.append(found)
    return out


def noun_phrase_spans(caption: str, chunker: str = "auto") -> list[Span]:
    """Noun-phrase character spans of a caption.

    chunker: 'nltk' is GLIP's own (NLTK's tokenizer and perceptron POS tagger, then the grammar
    'NP: {<DT>?<JJ.*>*<NN.*>+}'; needs `pip install nltk` and its tagger data); 'rules' is ovdense's rule-based
    chunker (phrases end at prepositions, conjunctions, common verbs and punctuation; no data needed); 'auto' takes
    NLTK when it is usable, else the rules.
    """
    if chunker not in ("auto", "nltk", "rules"):
        raise InputError(f"chunker must be 'auto', 'nltk' or 'rules', got {chunker!r}")
    if chunker != "rules":
        try:
            spans = _nltk_spans(caption)
        except (ImportError, LookupError) as error:
            if chunker == "nltk":
                raise InputError(f"the NLTK chunker is not usable here ({type(error).__name__}): pip install nltk "
                                 "and download its data with python -m nltk.downloader punkt_tab "
                                 "averaged_perceptron_tagger_eng") from error
        else:
            return spans
    from ..data.captions import phrase_spans
    return phrase_spans(caption, max_words=None, determiners=True)


def _nltk_spans(caption: str) -> list[Span]:
    """GLIP's `find_noun_phrases` with character spans: lower-cased words, POS tags, the NP grammar; each phrase
    located in the caption after the previous one."""
    import nltk
    lowered = caption.lower()
    tagged = nltk.pos_tag(nltk.word_tokenize(lowered))
    tree = nltk.RegexpParser("NP: {<DT>?<JJ.*>*<NN.*>+}").parse(tagged)
    spans, start = [], 0
    for subtree in tree.subtrees(lambda t: t.label() == "NP"):
        words = [word for word, _ in subtree.leaves()]
        pattern = r"\s*".join(re.escape(w) for w in words)
        match = re.compile(pattern).search(lowered, start)
        if match:
            spans.append(match.span())
            start = match.end()
    return spans


def _token_at(offsets: list[Span], char: int, last: bool) -> int | None:
    """A fast tokenizer's `char_to_token`: the token whose character span holds `char` (None for a space, a character
    past the end, or one no token covers); when several do (open_clip's pieces of one word share the word's span),
    the first, or the last when `last`."""
    found = [t for t, (a, b) in enumerate(offsets) if a <= char < b]
    return (found[-1] if last else found[0]) if found else None


def _first_token(offsets: list[Span], chars: tuple[int, ...], last: bool) -> int | None:
    """The token of the first of `chars` that has one."""
    return next((t for t in (_token_at(offsets, c, last) for c in chars) if t is not None), None)


def positive_map(offsets: list[Span], spans: list[list[Span]], length: int) -> torch.Tensor:
    """Which tokens each phrase covers (GLIP's `create_positive_map`): per-token character spans ((0, 0) for special
    tokens) and, per phrase, its character spans -> (P, length) bool. A span [start, end) runs from the token of
    character start (else start + 1, else start + 2) to the token of character end - 1 (else end - 2, else end - 3),
    both included; a span with no token at either end adds nothing (a name ending in a space takes the token
    before it)."""
    offsets = offsets[:length]
    out = torch.zeros(len(spans), length, dtype=torch.bool)
    for p, phrase in enumerate(spans):
        for start, end in phrase:
            first = _first_token(offsets, (start, start + 1, start + 2), last=False)
            final = _first_token(offsets, (end - 1, end - 2, end - 3), last=True)
            if first is not None and final is not None:
                out[p, first:final + 1] = True
    return out
