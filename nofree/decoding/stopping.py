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
where the search stopped them.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

__all__ = ["STOP_REASONS", "add_token", "end_caption"]

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
