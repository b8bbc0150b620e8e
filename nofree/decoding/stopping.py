"""Where a generated caption ends: the one stop rule of every decoding loop in nofree.

A caption grows one chosen token at a time and ends at the first of:

- **eos** (reason ``"eos"``): the LM's end-of-text token ends the caption and is never part of
  it, neither of its token ids nor of its text;
- **a period** (``"period"``, only with ``stop_at_period``): a token whose text contains ``"."``
  ends the caption, and is kept, once the caption's text holds a word before that ``"."``; a
  ``"."`` with no word before it (``"..."`` as the first token) does not end the caption;
- **the length limit** (``"length"``): ``max_tokens`` tokens kept.

:func:`add_token` applies the rule to one chosen token: MAGIC's and greedy decoding
(:mod:`nofree.decoding.magic`), which drop a row from the batch as soon as its caption ends.
:func:`end_caption` applies it to a sequence a search wrote in full: the trained captioners'
transformers ``generate`` (:mod:`nofree.adapters.captioning`), whose rows run on, padded, past
where the search stopped them. :func:`trim_cut` tidies a caption the length limit cut: it ends
at its last whole word, not on a function word or a comma.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

__all__ = ["DANGLING_WORDS", "STOP_REASONS", "add_token", "end_caption", "trim_cut"]

#: Why a caption ended, in the order :func:`add_token` checks them.
STOP_REASONS = ("eos", "period", "length")

_WORD = re.compile(r"\w")


def add_token(lm: Any, caption: list[int], token: int, *, stop_at_period: bool,
              max_tokens: int) -> str | None:
    """Append the chosen ``token`` to ``caption`` (in place; eos is never appended) and return why
    the caption ends there (one of :data:`STOP_REASONS`), or None when it goes on.

    ``lm``: anything with ``eos_id`` and ``decode`` (a :class:`nofree.core.LanguageModel`); the
    token's text is decoded only when ``stop_at_period``.
    """
    if token == lm.eos_id:
        return "eos"
    caption.append(token)
    if stop_at_period and "." in lm.decode([[token]])[0]:
        text = lm.decode([caption])[0]
        if _WORD.search(text[:text.rfind(".")]):
            return "period"
    if len(caption) >= max_tokens:
        return "length"
    return None


def end_caption(lm: Any, tokens: Sequence[int], *, stop_at_period: bool,
                max_tokens: int) -> tuple[list[int], str]:
    """The caption a generated token sequence holds and why it ends, by :func:`add_token`'s rule.

    A sequence that runs out before any stop (the search wrote no more tokens) ends with it:
    ``"length"``.
    """
    caption: list[int] = []
    for token in tokens:
        reason = add_token(lm, caption, int(token), stop_at_period=stop_at_period, max_tokens=max_tokens)
        if reason is not None:
            return caption, reason
    return caption, "length"


#: Words a caption cut by the length limit is not left ending on: English articles, prepositions,
#: conjunctions, possessives and auxiliaries ("… and a round plate of food with").
DANGLING_WORDS = frozenset(
    "a an the and or but with of on in at to for from by near next under over into onto behind beside "
    "while as that which who is are its their his her".split())


def trim_cut(lm: Any, ids: Sequence[int], limit: int) -> str:
    """The text of a caption cut at ``limit`` tokens, tidied: ``ids`` is what the search wrote with
    one token of look-ahead (``limit + 1`` tokens, the last not kept). A look-ahead token that goes
    on with the last word ("pl" + "ate") shows the word was cut, and it is dropped; then trailing
    :data:`DANGLING_WORDS` and punctuation go. A look-ahead holding a period ends a whole sentence
    there, kept in full. The caption is never emptied: with nothing left, the cut text stays.

    On CIDEr the tidying is neutral (one draft per photo in MAGIC's cross-validation: 52.6 either
    way; RESULTS.md, "Training-free captioning quality"); it stops captions ending "… on a pl".
    """
    head = lm.decode([list(ids[:limit])])[0]
    if len(ids) <= limit:
        return head
    ahead = lm.decode([list(ids[:limit + 1])])[0]
    extra = ahead[len(head):] if ahead.startswith(head) else " "
    if "." in extra and _WORD.search(head):
        return ahead
    words = head.rstrip().split(" ")
    if extra[:1].isalnum() and not head.endswith(" "):
        words = words[:-1]
    while words and (words[-1].lower().strip(",;:-") in DANGLING_WORDS or not words[-1].strip(",;:-")):
        words = words[:-1]
    return " ".join(words).rstrip(",;:- ") or head
