"""MAGIC decoding (Su et al., 2022): a frozen LM steered step by step by an image–text scorer.

``magic_search`` / ``greedy_search`` live in :mod:`nofree.decoding.magic`; the scorers
(``ClipScorer``, ``AsifScorer``, ``CallableScorer``) in :mod:`nofree.decoding.scorers`.
Names load lazily so ``import nofree.decoding`` stays light.
"""
from __future__ import annotations

from nofree._lazy import lazy_getattr

_LAZY = {
    "magic_search": "nofree.decoding.magic",
    "greedy_search": "nofree.decoding.magic",
    "Generation": "nofree.decoding.magic",
    "StepTrace": "nofree.decoding.magic",
    "magic_generate": "nofree.decoding.magic",
    "magic_custom_generate": "nofree.decoding.magic",
    "Scorer": "nofree.decoding.scorers",
    "ClipScorer": "nofree.decoding.scorers",
    "AsifScorer": "nofree.decoding.scorers",
    "CallableScorer": "nofree.decoding.scorers",
    "as_scorer": "nofree.decoding.scorers",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("nofree.decoding", _LAZY, globals())
