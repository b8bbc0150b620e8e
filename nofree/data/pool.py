"""Caption-pool hygiene: drop the lines of a caption pool that are not captions.

A caption pool (``nofree/sample/caption_corpus.txt``, a user's ``--pool`` file) is the set of
candidate captions retrieval captioning returns as they are and MAGIC / SmallCap show the LM as
examples, so one non-caption in it ("I am unable to see an image above.", written by a crowd
worker whose image did not load) can come back verbatim as a photo's caption.
:func:`filter_pool` keeps a line unless it is, checked in this order:

- ``empty``: nothing but whitespace;
- ``too_short``: fewer than ``min_words`` (2) words, a word being a whitespace-separated token
  with a letter in it (``"dog"`` and ``"n/a"`` have one, ``"..."`` and ``"12 34"`` none): a label
  or junk, not a sentence (the bundled COCO pool's shortest caption has 7 words; "a cat" passes);
- ``too_long``: more than ``max_words`` (60) words: a paragraph, not a caption (the bundled
  pool's longest caption has 50; CLIP-style text encoders cut at 77 tokens, ~60 words);
- ``meta``: text about the image or the annotation task instead of a description of the photo
  (:data:`META_PATTERNS`): a refusal to describe ("I am unable to see the image", "there is no
  image here to provide a caption for", "I do not know what this is"), an image that did not
  load ("picture not loading", "image is not available"), the crowdsourcing task ("in this
  particular hit", "Mechanical Turk", "annotator"), a placeholder line ("N/A", "no caption")
  or a link (``http://``);
- ``stutter``: a word typed twice in a row, with only whitespace between and case ignored ("a
  living room with with a couch", "a a small bathroom"): a typo that retrieval would return as
  it is and that an LM shown it as an example learns to copy. Words split by punctuation
  ("a computer, computer keyboard") are kept. The rule also drops the rare line where the
  repeat is English ("turned on on a desk", "a coo coo clock"; the bundled pool's README counts
  them), a small price for a pool of thousands;
- ``duplicate``: equal to an earlier kept line up to case, runs of whitespace and trailing
  periods (the first one is kept).

The patterns are deliberately narrow: a refusal needs both the image/picture/photo and the
negation next to it, or has to open the line with "I" ("I am unable to see ..."), and a task
"hit" needs "in/on/for this hit"; so captions that merely mention a sign, a picture or the
word "no" stay ("A sign that says no parking.", "An image of a cat on a couch.",
"A bedroom with a picture above the bed.", "The batter swings for the hit."). Opinions and
questions with visual content stay too ("I love the way the sun is creeping behind those
buildings", "Why would the cow be grazing in front of those homes?"). Kept lines are returned
unchanged, in pool order.

Also here, as the pool's other shared rules: :func:`duplicate_key` (when two captions are the
same) and :func:`example_windows` (which of an image's ranked pool captions each of several
drafts reads as examples, for MAGIC and SmallCap-style alike).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

#: Why a line is dropped, in the order the checks run.
REASONS = ("empty", "too_short", "too_long", "meta", "stutter", "duplicate")
#: Default word bounds of a caption (see the module docstring for why).
MIN_WORDS, MAX_WORDS = 2, 60

_IMAGE = r"(?:image|picture|photo(?:graph)?|pic|img)s?"
_NEGATED = (r"(?:unable\s+to|not\s+able\s+to|can\s*not|can'?t|could\s*not|couldn'?t|do\s+not|don'?t"
            r"|does\s+not|doesn'?t|did\s+not|didn'?t|will\s+not|won'?t|fail(?:s|ed)?\s+to)")
_SEE = r"(?:see|view|load|open|find|display|show)"

#: The ``meta`` rule: a line matching any of these (case-insensitive) talks about the image or
#: the annotation task rather than describing a photo.
META_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    # "I am unable to see ...", "I can't view ...", "I don't see ...": a refusal opening the line
    rf"^\W*(?:sorry\W+)?I(?:\s*'m|\s+am|\s+was)?\s+{_NEGATED}\s+{_SEE}\b",
    # "unable to see this image", "can't load the picture"
    rf"\b{_NEGATED}\s+{_SEE}\w*\s+(?:(?:the|an|a|any|this|that|these|those)\s+)?{_IMAGE}\b",
    # "image not loading", "the picture did not load", "image is not available"
    rf"\b{_IMAGE}\s+(?:(?:is|are|was|were|has|have|did|does|do|will|would)\s+)?(?:still\s+)?"
    rf"(?:not|never|won'?t|didn'?t|doesn'?t|isn'?t|wasn'?t|aren'?t|fail(?:s|ed)?\s+to)\s+(?:be\s+)?"
    rf"(?:load|(?:show|display|appear|open|work)\w*(?:\s+(?:up|here|properly|correctly))?\W*$"
    rf"|(?:available|visible)(?:\s+here)?\W*$)",
    # "there is no image here to provide a caption for", "no image again", "no picture shown"
    rf"\bno\s+{_IMAGE}\s+(?:here|above|again|available|shown|showing|loaded|loading|displayed|provided"
    rf"|visible|appears?|to\s+(?:be\s+)?(?:review|describ|caption|see|view|provid|rate|comment|look))",
    rf"^\W*(?:there\s+(?:is|was|'s)\s+)?no\s+{_IMAGE}\W*$",
    # "... the image above." (the task page's wording)
    rf"\b(?:{_SEE}\w*\s+(?:the|an|a|this)|the)\s+{_IMAGE}\s+above\W*$",
    # "I am not sure what this image is", "I do not know what this is supposed to be"
    r"^\W*I(?:\s*'m|\s+am)?\s+(?:not\s+sure|unsure|do\s+not\s+know|don'?t\s+know|have\s+no\s+idea"
    r"|can'?t\s+tell|can\s*not\s+tell)\b",
    # the crowdsourcing task itself
    r"\b(?:in|on|for)\s+(?:this|that|each)\s+(?:particular\s+)?hits?\b",
    r"\b(?:mturk|mechanical\s+turk|turkers?|annotators?|worker\s+id)\b",
    rf"\b(?:caption|describe)\s+(?:this|the)\s+{_IMAGE}\s*[.!:]?\s*$",
    # a placeholder instead of a caption, or a link
    r"^\W*(?:n/?a|none|null|nan|no\s+caption|no\s+description|not\s+applicable|test|todo|tbd"
    r"|error|blank|empty|skip(?:ped)?)\W*$",
    r"\bhttps?://",
))

_WORD = re.compile(r"\S*[^\W\d_]\S*")
#: The ``stutter`` rule: a word of letters (apostrophes allowed) followed, after whitespace
#: only, by itself.
STUTTER = re.compile(r"(?<![\w'])([^\W\d_][\w']*)\s+\1(?![\w'])", re.IGNORECASE)


@dataclass(frozen=True)
class FilteredPool:
    """What :func:`filter_pool` kept (``captions``, pool order, unchanged) and dropped
    (``dropped``: reason -> the dropped lines, pool order; every reason of :data:`REASONS`)."""

    captions: list[str]
    dropped: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in REASONS})

    @property
    def counts(self) -> dict[str, int]:
        """How many lines each reason dropped (zeros included)."""
        return {reason: len(lines) for reason, lines in self.dropped.items()}

    @property
    def n_dropped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: ``dropped 12 of 24219 lines (meta 6, duplicate 6)``."""
        total = len(self.captions) + self.n_dropped
        why = ", ".join(f"{reason} {n}" for reason, n in self.counts.items() if n)
        return f"dropped {self.n_dropped} of {total} lines" + (f" ({why})" if why else "")


def default_pool_path() -> Path:
    """The bundled caption pool: 24k COCO captions, none of them of a sample photo (cleaned by
    :func:`filter_pool`: no line of it is dropped)."""
    from nofree import sample_dir

    return sample_dir() / "caption_corpus.txt"


def caption_problem(text: str, *, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> str | None:
    """Why the line ``text`` is not a caption (a reason of :data:`REASONS` but ``duplicate``), or
    None when it is one."""
    if not text.strip():
        return "empty"
    words = len(_WORD.findall(text))
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    plain = text.replace("\u2019", "'")   # a typographic apostrophe: "can\u2019t"
    if any(pattern.search(plain) for pattern in META_PATTERNS):
        return "meta"
    if STUTTER.search(plain):
        return "stutter"
    return None


def duplicate_key(text: str) -> str:
    """The form two lines must share to be duplicates: lower case, whitespace runs as one
    space, trailing periods and spaces dropped."""
    return " ".join(text.split()).lower().rstrip(". ")


def filter_pool(lines: Iterable[str], *, min_words: int = MIN_WORDS,
                max_words: int = MAX_WORDS) -> FilteredPool:
    """The captions of a caption pool: ``lines`` without the non-captions and repeats the module
    docstring lists (its rules, in its order; a line counts under its first reason only).
    Pure and deterministic; applying it to its own ``captions`` drops nothing."""
    captions: list[str] = []
    dropped: dict[str, list[str]] = {reason: [] for reason in REASONS}
    seen: set[str] = set()
    for line in lines:
        reason = caption_problem(line, min_words=min_words, max_words=max_words)
        if reason is None:
            key = duplicate_key(line)
            reason = "duplicate" if key in seen else None
            seen.add(key)
        if reason is None:
            captions.append(line)
        else:
            dropped[reason].append(line)
    return FilteredPool(captions, dropped)


def example_windows(examples: int, drafts: int) -> list[tuple[int, int]]:
    """The in-context example windows ``(first, count)`` of several drafts over an image's ranked
    pool captions (MAGIC's and SmallCap's): the ``examples`` best, then fewer, more, and shifted
    windows (``examples=4``: 0:4, 0:2, 0:3, 0:5, 1:4, 2:4, 4:4, 0:8), the first ``drafts`` of them."""
    m = int(examples)
    schedule = [(0, m), (0, max(1, m // 2)), (0, max(1, m - 1)), (0, m + 1), (1, m), (2, m), (m, m), (0, 2 * m)]
    return list(dict.fromkeys(schedule))[:max(1, int(drafts))] if m else [(0, 0)]
