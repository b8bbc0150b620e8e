"""Feature-level augmentation: extra views of each training photo, encoded once like the photo.

The towers are frozen, so an augmented view is just another set of frozen features: each view is
encoded once before training (through the embedding cache when one is given) and each training
row then takes, every epoch, the photo's own features or one of its views at random
(:meth:`nofree.adapters.train.Examples.batch`). The cost is one more encoding pass per view, not
one per epoch.

- ``"hflip"``: the photo mirrored left to right, the usual captioning augmentation. A caption
  that says "left" or "right" becomes wrong for the mirrored view; COCO-style captions rarely do.
- ``"crops"``: the mirrored view and four corner crops, each keeping :data:`CROP_SIDE` of the
  photo's width and height (the "four corners" of the ten-crop evaluation of Krizhevsky et al.
  (2012), here as training views). A crop can lose an object its caption names at the edge; most
  COCO captions name what is in the middle.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor

from nofree.adapters.recipes import AUGMENTATIONS

#: The share of each side a corner crop keeps.
CROP_SIDE = 0.8
CORNERS = ("tl", "tr", "bl", "br")


class ViewEncoder:
    """An image encoder that sees every image through ``transform`` (PIL image → PIL image).

    Its ``spec`` is the encoder's with ``#name`` appended, so the embedding cache keeps the views
    apart; everything else is the wrapped encoder's.
    """

    modality = "image"

    def __init__(self, encoder: Any, name: str, transform: Callable[[Any], Any]) -> None:
        self.encoder = encoder
        self.transform = transform
        self.spec = f"{encoder.spec}#{name}"
        self.embed_dim = encoder.embed_dim
        self.token_dim = getattr(encoder, "token_dim", 0)

    def _views(self, images: Sequence[Any]) -> list[Any]:
        return [self.transform(image) for image in images]

    def encode(self, images: Sequence[Any], **kw: Any) -> Tensor:
        return self.encoder.encode(self._views(images), **kw)

    def encode_tokens(self, images: Sequence[Any], **kw: Any) -> Tensor:
        return self.encoder.encode_tokens(self._views(images), **kw)


def mirror(image: Any) -> Any:
    """``image`` mirrored left to right."""
    from PIL import ImageOps

    return ImageOps.mirror(image)


def corner_crop(corner: str, side: float = CROP_SIDE) -> Callable[[Any], Any]:
    """A transform keeping ``side`` of the width and height at one corner (``"tl"``, ``"tr"``,
    ``"bl"`` or ``"br"``)."""
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {', '.join(CORNERS)}, got {corner!r}")

    def crop(image: Any) -> Any:
        width, height = image.size
        w, h = max(1, round(side * width)), max(1, round(side * height))
        left = width - w if corner[1] == "r" else 0
        top = height - h if corner[0] == "b" else 0
        return image.crop((left, top, left + w, top + h))

    return crop


class MirroredImageEncoder(ViewEncoder):
    """The ``"hflip"`` view of ``encoder``: every image mirrored (spec ``…#hflip``)."""

    def __init__(self, encoder: Any) -> None:
        super().__init__(encoder, "hflip", mirror)


def view_encoders(encoder: Any, augment: str) -> list[Any]:
    """The encoders of the extra views ``augment`` asks for (none for ``"none"``)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    views = [MirroredImageEncoder(encoder)] if augment in ("hflip", "crops") else []
    if augment == "crops":
        views += [ViewEncoder(encoder, f"crop{round(100 * CROP_SIDE)}-{corner}", corner_crop(corner))
                  for corner in CORNERS]
    return views
