"""Feature-level augmentation: extra views of each training photo, encoded once like the photo.

The towers are frozen, so an augmented view is just another set of frozen features: each view is
encoded once before training (through the embedding cache when one is given) and each training
row then takes, every epoch, the photo's own features or one of its views at random
(:meth:`nofree.adapters.train.Examples.batch`). The cost is one more encoding pass per view, not
one per epoch.

``"hflip"``: the photo mirrored left to right, the usual captioning augmentation. A caption that
says "left" or "right" becomes wrong for the mirrored view; COCO-style captions rarely do.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

AUGMENTATIONS = ("none", "hflip")


class MirroredImageEncoder:
    """An image encoder that sees every image mirrored left to right.

    Its ``spec`` is the encoder's with ``#hflip`` appended, so the embedding cache keeps the two
    views apart; everything else is the wrapped encoder's.
    """

    modality = "image"

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.spec = f"{encoder.spec}#hflip"
        self.embed_dim = encoder.embed_dim
        self.token_dim = getattr(encoder, "token_dim", 0)

    @staticmethod
    def _mirror(images: Sequence[Any]) -> list[Any]:
        from PIL import ImageOps

        return [ImageOps.mirror(image) for image in images]

    def encode(self, images: Sequence[Any], **kw: Any) -> Tensor:
        return self.encoder.encode(self._mirror(images), **kw)

    def encode_tokens(self, images: Sequence[Any], **kw: Any) -> Tensor:
        return self.encoder.encode_tokens(self._mirror(images), **kw)


def view_encoders(encoder: Any, augment: str) -> list[Any]:
    """The encoders of the extra views ``augment`` asks for (none for ``"none"``)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    return [MirroredImageEncoder(encoder)] if augment == "hflip" else []
