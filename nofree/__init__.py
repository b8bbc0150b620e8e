"""nofree: compose frozen pretrained models into multimodal systems without training them.

``import nofree`` is light: heavy backends (transformers, open_clip, faiss) load lazily on
first use of the name that needs them.
"""
from __future__ import annotations

from nofree._lazy import lazy_getattr

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "Pair": "nofree.core",
    "Encoder": "nofree.core",
    "LanguageModel": "nofree.core",
    "LMStep": "nofree.core",
    "Captioner": "nofree.core",
    "NofreeError": "nofree.core",
    "load_encoder": "nofree.registry",
    "load_lm": "nofree.registry",
    "list_encoders": "nofree.registry",
    "list_lms": "nofree.registry",
    "load_pairs": "nofree.data.pairs",
    "EmbeddingCache": "nofree.cache",
    "AnchorSet": "nofree.anchors.anchor_set",
    "ASIF": "nofree.anchors.asif",
    "build_anchor_set": "nofree.anchors.build",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_getattr("nofree", _LAZY, globals())


def sample_dir():
    """The folder of the bundled coco-mini sample (images, pairs.jsonl, caption_corpus.txt)."""
    from pathlib import Path

    return Path(__file__).parent / "sample"
