"""Classifier heads of frozen image encoders: their weights and class names, read as words by
:mod:`nofree.anchors.labels`."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from nofree.core import DataError


@dataclass(frozen=True)
class ClassifierHead:
    """A frozen image encoder's classification layer: ``weight (C, Di)`` and the C class names."""

    weight: Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.weight.ndim != 2 or self.weight.shape[0] != len(self.names):
            raise DataError(f"a classifier head needs one weight row per class name: got weight "
                            f"{tuple(self.weight.shape)} and {len(self.names)} names")


def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in the standard index order (torchvision's list)."""
    from torchvision.models import EfficientNet_B0_Weights

    return tuple(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])
