"""Frozen single-modality encoders (the ``nofree.core.Encoder`` protocol).

Build them from spec strings with :func:`nofree.load_encoder`; the backends live in
``open_clip.py``, ``hf.py`` and ``embedded.py`` and import their heavy packages lazily.
This package exports only the light base pieces.
"""
from nofree.encoders.base import FrozenEncoder, FrozenModule, freeze, is_frozen

__all__ = ["FrozenEncoder", "FrozenModule", "freeze", "is_frozen"]
