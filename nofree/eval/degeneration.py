"""Collapse and looping of a captioner, measured: distinct-caption rate, repeated word n-grams and
stuttered words.

A captioner can score a respectable BLEU while writing one sentence for every photo (it has
learnt the caption style, not the image) or while looping ("a couple of people wearing shorts
and a couple of people wearing shorts and ..."). These numbers make both visible beside the
COCO metrics:

- ``distinct``: distinct captions / captions, after lower-casing and dropping punctuation (1.0:
  every photo got its own caption; 1/n: one caption for all);
- ``repeat_3gram``: fraction of captions in which some word 3-gram occurs more than once;
- ``worst_repeat``: the most times one word 3-gram occurs in a single caption (1 when none
  repeats, 0 for empty captions);
- ``stutter``: fraction of captions in which a word directly follows itself ("a sink, sink,
  sink and a bathtub", "a baseball baseball player"). Word 3-grams miss these single-word
  repeats and the word salads that contain them; a human caption stutters only by a typo
  ("on on a table"), so the rate of human references is near 0.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"[a-z0-9']+")


def words(caption: str) -> list[str]:
    """Lower-cased word tokens of ``caption`` (punctuation dropped)."""
    return _WORD.findall(caption.lower())


def max_ngram_count(caption: str, n: int = 3) -> int:
    """How often the most frequent word ``n``-gram occurs in ``caption`` (0 when it has < n words)."""
    tokens = words(caption)
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return max(grams.values(), default=0)


def stutters(caption: str) -> bool:
    """Whether some word of ``caption`` directly follows itself (punctuation between them ignored)."""
    tokens = words(caption)
    return any(a == b for a, b in zip(tokens, tokens[1:]))


def degenerate(caption: str, n: int = 3) -> bool:
    """Whether ``caption`` loops (a word ``n``-gram occurs twice) or stutters: the faults these
    measures count, of one caption."""
    return max_ngram_count(caption, n) > 1 or stutters(caption)


def degeneration(captions: Sequence[str | None], n: int = 3) -> dict[str, float | int]:
    """``{"distinct", "repeat_3gram", "worst_repeat", "stutter", "n_captions"}`` of a list of captions
    (``None`` entries, failed images, are left out). ``n`` sets the n-gram order of the
    repetition measures (the keys keep their names)."""
    kept = [c for c in captions if c is not None]
    if not kept:
        return {"distinct": 0.0, "repeat_3gram": 0.0, "worst_repeat": 0, "stutter": 0.0, "n_captions": 0}
    counts = [max_ngram_count(c, n) for c in kept]
    return {"distinct": len({" ".join(words(c)) for c in kept}) / len(kept),
            "repeat_3gram": sum(c > 1 for c in counts) / len(kept),
            "worst_repeat": max(counts),
            "stutter": sum(map(stutters, kept)) / len(kept),
            "n_captions": len(kept)}
