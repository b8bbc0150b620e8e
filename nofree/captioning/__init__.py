"""Captioning: one ``caption(images) -> list[str]`` protocol (:class:`nofree.core.Captioner`) over every method.

- :mod:`~nofree.captioning.retrieval`: :class:`RetrievalCaptioner`, the best caption of a text
  pool by image–text similarity, re-ranked by consensus;
- :mod:`~nofree.captioning.drafts`: :class:`MagicCaptioner`, a frozen LM prompted with retrieved
  captions writes drafts (MAGIC decoding, :mod:`nofree.decoding`) and consensus keeps one;
- :mod:`~nofree.captioning.consensus`: the consensus measures both use (CIDEr-D, embeddings);
- :mod:`~nofree.captioning.factory`: :func:`load_captioner` (a method name to a captioner) and
  :func:`caption_paths` (image files to captions).

The trained captioners (``AdapterCaptioner``, ``SmallCapCaptioner``) live with their adapters in
:mod:`nofree.adapters`. Names load lazily so ``import nofree.captioning`` stays light.
"""
from __future__ import annotations

from nofree._lazy import lazy_getattr

_LAZY = {
    "RetrievalCaptioner": "nofree.captioning.retrieval",
    "CONSENSUS_RERANK": "nofree.captioning.retrieval",
    "default_pool_path": "nofree.data.pool",
    "MagicCaptioner": "nofree.captioning.drafts",
    "MAGIC_DEFAULTS": "nofree.captioning.drafts",
    "MAGIC_PAPER": "nofree.captioning.drafts",
    "PLAIN_PROMPT": "nofree.captioning.drafts",
    "example_windows": "nofree.captioning.drafts",
    "CiderD": "nofree.eval.cider_d",
    "consensus_scores": "nofree.captioning.consensus",
    "consensus_rerank": "nofree.captioning.consensus",
    "load_captioner": "nofree.captioning.factory",
    "caption_paths": "nofree.captioning.factory",
    "iter_caption_paths": "nofree.captioning.factory",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("nofree.captioning", _LAZY, globals())
