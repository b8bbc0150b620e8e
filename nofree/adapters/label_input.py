"""The image encoder's classifier read as words, as an extra input of a captioning adapter.

The label bridge (:mod:`nofree.anchors.labels`) gives every photo a *label view*: the
probability-weighted mean of the text embeddings of the ImageNet class names its classifier head
scores, a vector in a text encoder's space, from no paired data. Training-free composition
compares images and texts through it; a trained captioner on the same frozen backbones gets the
same signal as an input, so that the frozen-vs-trained comparison is made on equal inputs.
ClipCap (Mokady et al., 2021) was designed around CLIP embeddings, which are already aligned
with text; an ImageNet encoder's embedding is not, and a few hundred captions are little to
learn that alignment from, while the label view brings it for free.

:class:`LabelInput` holds what the view needs: the head's weights (read from the frozen image
encoder, never saved) and the class names' text embeddings (a buffer saved with the adapter's
weights, so that captioning needs no text encoder). ``label_encoder`` (the text encoder's spec,
recorded in the adapter's config) and ``label_dim`` (its width) switch it on; the names are
embedded once, before training, by :meth:`LabelInput.embed_label_names`
(:func:`nofree.adapters.train.with_label_inputs` resolves the settings and the text encoder).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from nofree.anchors.labels import LABEL_DEFAULTS, LABEL_TEMPLATE, label_view
from nofree.core import SpecError, l2_normalize


class LabelInput(nn.Module):
    """The label view of pooled image embeddings, for an adapter (a submodule without weights
    of its own to train).

    ``image_encoder`` must have a classifier head (``classifier_head()``, e.g. the embedded
    EfficientNet-Lite encoders); ``label_encoder`` is the spec of the text encoder whose
    embeddings of the class names (``label_dim`` wide) define the view, ``temperature`` the
    softmax temperature over the head's logits (the label bridge's default).
    """

    def __init__(self, image_encoder: Any, label_encoder: str, label_dim: int,
                 temperature: float = LABEL_DEFAULTS["temperature"]) -> None:
        super().__init__()
        head_of = getattr(image_encoder, "classifier_head", None)
        head = head_of() if callable(head_of) else None
        if head is None:
            raise ValueError(f"label inputs need an image encoder with a classifier head; "
                             f"{image_encoder.spec!r} has none (leave label_encoder empty)")
        if int(label_dim) < 1 or not float(temperature) > 0:
            raise ValueError(f"label_dim must be >= 1 and label_temperature > 0, got {label_dim!r}, "
                             f"{temperature!r}")
        self.spec, self.names, self.temperature = str(label_encoder), head.names, float(temperature)
        self.register_buffer("head_weight", head.weight.float(), persistent=False)
        self.register_buffer("label_emb", torch.zeros(len(head.names), int(label_dim)))

    def embed_label_names(self, text_encoder: Any) -> None:
        """Embed the class names with ``text_encoder`` (it must carry the recorded spec and width)."""
        if text_encoder.spec != self.spec:
            raise SpecError(f"the label inputs were set up for {self.spec!r}, but the text encoder "
                            f"is {text_encoder.spec!r}")
        emb = text_encoder.encode([LABEL_TEMPLATE.format(name) for name in self.names])
        if emb.shape != self.label_emb.shape:
            raise SpecError(f"{self.spec} embeds the class names as {tuple(emb.shape)}, expected "
                            f"{tuple(self.label_emb.shape)}; set label_dim to its width")
        with torch.no_grad():
            self.label_emb.copy_(l2_normalize(emb.float()))

    def forward(self, image_emb: Tensor) -> Tensor:
        """``(B, label_dim)`` unit label views of pooled image embeddings ``(B, Di)``."""
        if not self.label_emb.any():
            raise RuntimeError("the class names are not embedded yet: call "
                               "embed_label_names(text_encoder) before training")
        return label_view(image_emb.float(), self.head_weight, self.label_emb, self.temperature)


def label_input(image_encoder: Any, label_encoder: str, label_dim: int,
                temperature: float) -> LabelInput | None:
    """A :class:`LabelInput`, or None when ``label_encoder`` is empty (the input is off)."""
    return LabelInput(image_encoder, label_encoder, label_dim, temperature) if label_encoder else None

