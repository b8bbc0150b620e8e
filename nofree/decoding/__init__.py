"""MAGIC decoding (Su et al., 2022): a frozen LM steered step by step by an image–text scorer.

``magic_search`` / ``greedy_search`` live in :mod:`nofree.decoding.magic` (on any
:class:`nofree.core.LanguageModel`), ``magic_generate`` / ``magic_custom_generate`` (on a plain
transformers model) in :mod:`nofree.decoding.hf_generate`, the rule that ends a caption in
:mod:`nofree.decoding.stopping`; the scorer protocol with ``AsifScorer`` and ``CallableScorer`` in
:mod:`nofree.decoding.scorers`, ``ClipScorer`` in :mod:`nofree.decoding.clip_scorer`.
Names load lazily so ``import nofree.decoding`` stays light.
"""
from __future__ import annotations

from nofree._lazy import lazy_getattr

_LAZY = {
    "magic_search": "nofree.decoding.magic",
    "greedy_search": "nofree.decoding.magic",
    "Generation": "nofree.decoding.magic",
    "StepTrace": "nofree.decoding.magic",
    "magic_generate": "nofree.decoding.hf_generate",
    "magic_custom_generate": "nofree.decoding.hf_generate",
    "Scorer": "nofree.decoding.scorers",
    "ClipScorer": "nofree.decoding.clip_scorer",
    "AsifScorer": "nofree.decoding.scorers",
    "CallableScorer": "nofree.decoding.scorers",
    "as_scorer": "nofree.decoding.scorers",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("nofree.decoding", _LAZY, globals())
