"""Trainable adapters on the frozen core: LiT, ClipCap, a Flamingo-style and a SmallCap-style captioner.

Only the adapters' own weights train; image encoders, text encoders and language models stay
frozen. Every adapter saves with ``save_pretrained(dir)`` and loads with ``from_pretrained(dir)``
(or :func:`load_adapter`, which reads the kind from the folder). Names load lazily, so importing
this package does not import transformers.
"""
from __future__ import annotations

from nofree._lazy import lazy_getattr

_LAZY = {
    "Adapter": "nofree.adapters.base",
    "CaptioningAdapter": "nofree.adapters.captioning",
    "AdapterCaptioner": "nofree.adapters.captioning",
    "load_adapter": "nofree.adapters.base",
    "count_parameters": "nofree.adapters.base",
    "LiT": "nofree.adapters.lit",
    "ClipCap": "nofree.adapters.clipcap",
    "Flamingo": "nofree.adapters.flamingo",
    "find_decoder_layers": "nofree.adapters.flamingo",
    "SmallCap": "nofree.adapters.smallcap",
    "SmallCapCaptioner": "nofree.adapters.smallcap",
    "train_smallcap": "nofree.adapters.smallcap",
    "Examples": "nofree.adapters.train",
    "TrainResult": "nofree.adapters.train",
    "prepare_examples": "nofree.adapters.train",
    "train_adapter": "nofree.adapters.train",
    "train_lit": "nofree.adapters.train",
    "train_clipcap": "nofree.adapters.train",
    "train_flamingo": "nofree.adapters.train",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("nofree.adapters", _LAZY, globals())
