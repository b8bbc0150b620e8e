"""The image encoder's own classifier as a second bridge from images to text: the label bridge.

An ImageNet classifier already says what it sees in words: its head scores 1,000 classes that
have English names. Embedding those names with the *text* encoder puts every image in the text
space without a single paired example (the label view):

    v(x) = normalise( softmax(W·x / t) · E )

x: the image embedding (L2-normalised pooled features, the vector the head reads, rescaled),
W ``(C, Di)``: the head's weights (its bias is left out: the embedding has lost the feature norm
the bias was trained against), t: a softmax temperature, E ``(C, Dt)``: the text embeddings of
"a photo of a {class name}.". Each side is centred on its anchor mean (the anchor images' label
views, the anchor captions' embeddings) and compared by cosine. :class:`LabelBridge` adds this
to the ASIF similarity of the anchors it is fitted on:

    s(x, y) = c · ( s_ASIF(x, y) + λ · (σ_ASIF / σ_label) · cos(v(x) − m_v, y − m_y) )

σ: each term's standard deviation over anchor images × anchor captions, so λ weighs spreads of
the same size; c rescales the sum to ASIF's own spread, so temperatures set for ASIF scores keep
their meaning. Reading a vision model's class names as text to connect it to language models
is the idea of Socratic Models (Zeng et al., 2022) and LENS (Berrios et al., 2023); here the
names are mixed with ASIF's anchor-based similarity instead of replacing it.

The bridge needs an image encoder with a classifier head (``classifier_head()``: the embedded
EfficientNet-Lite encoders have one); with any other encoder, or ``weight=0``, nofree uses the
plain ASIF similarity. :data:`LABEL_DEFAULTS` were chosen by cross-validation on the coco-mini
``train`` split (``benchmarks/asif_features.py``, reported in ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from nofree.core import DataError, l2_normalize
from nofree.encoders.heads import ClassifierHead

#: λ (the label term's weight, 0 turns the bridge off) and t (the softmax temperature over the
#: head's logits of the unit-length embedding).
LABEL_DEFAULTS = {"weight": 2.0, "temperature": 0.25}
#: How the class names are written before the text encoder embeds them.
LABEL_TEMPLATE = "a photo of a {}."
#: The spreads σ are measured on at most this many anchor images × anchor captions (a seeded
#: random subset of a larger set).
SCALE_SAMPLE = 1024


def label_view(image_emb: Tensor, head_weight: Tensor, label_emb: Tensor, temperature: float) -> Tensor:
    """``(n, Dt)`` unit rows: the class-probability-weighted mean of the class names' embeddings.

    image_emb ``(n, Di)``, head_weight ``(C, Di)``, label_emb ``(C, Dt)``.
    """
    logits = l2_normalize(image_emb.float()) @ head_weight.T.float()          # (n, C)
    return l2_normalize(torch.softmax(logits / temperature, dim=1) @ label_emb.float())


def check_label_params(weight: float, temperature: float) -> None:
    """Raise ``DataError`` unless the weight is a finite number >= 0 and the temperature one > 0."""
    for name, value, positive in (("label weight", weight, False), ("label temperature", temperature, True)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (positive and value == 0):
            raise DataError(f"the {name} must be a finite number {'> 0' if positive else '>= 0 (0: off)'}, "
                            f"got {value!r}")


class Bridged(NamedTuple):
    """What :class:`LabelBridge` compares one side by, computed once (e.g. for a caption pool).

    rel:  the ASIF relative representation (``SparseRelative``)
    side: ``(n, Dt)`` unit rows: centred label views (images) or centred embeddings (texts)
    """

    rel: Any
    side: Tensor


class LabelBridge:
    """A fitted ASIF plus the label term; quacks like the ASIF it wraps (``transform``,
    ``similarity``, ``hubness``; any other attribute is the wrapped ASIF's).

    asif: a fitted :class:`~nofree.anchors.asif.ASIF`; head: the image encoder's
    :class:`ClassifierHead`; label_emb ``(C, Dt)``: the text encoder's embeddings of the class
    names (:data:`LABEL_TEMPLATE`). Call :meth:`fit` with the anchors the ASIF was fitted on.
    The label term is computed on the CPU (two small products per image, whatever the ASIF's
    device); similarities come back on the CPU.
    """

    def __init__(self, asif: Any, head: ClassifierHead, label_emb: Tensor, *,
                 weight: float = LABEL_DEFAULTS["weight"],
                 temperature: float = LABEL_DEFAULTS["temperature"]) -> None:
        check_label_params(weight, temperature)
        if label_emb.ndim != 2 or label_emb.shape[0] != len(head.names):
            raise DataError(f"label embeddings {tuple(label_emb.shape)} do not match the head's "
                            f"{len(head.names)} classes")
        self.asif, self.head, self.label_emb = asif, head, label_emb.float().cpu()
        self.weight, self.temperature = float(weight), float(temperature)

    def __repr__(self) -> str:
        return (f"LabelBridge({self.asif!r}, weight={self.weight:g}, temperature={self.temperature:g}, "
                f"classes={len(self.head.names)})")

    def __getattr__(self, name: str) -> Any:
        if name == "asif":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self.asif, name)

    def fit(self, anchors: Any) -> "LabelBridge":
        """Anchor means and spreads from ``anchors`` (an AnchorSet or ``(image, text)``)."""
        from nofree.anchors.asif import _anchor_pair

        image, text = (torch.as_tensor(a).float().cpu() for a in _anchor_pair(anchors))
        if image.shape[1] != self.head.weight.shape[1]:
            raise DataError(f"the classifier head reads {self.head.weight.shape[1]}-d image embeddings but "
                            f"the anchors' are {image.shape[1]}-d: use the image encoder that built them")
        self.image_centre_ = self._label_view(image).mean(0)
        self.text_centre_ = l2_normalize(text).mean(0)
        gen = torch.Generator().manual_seed(0)
        rows = torch.randperm(len(image), generator=gen)[:SCALE_SAMPLE]
        asif_sim = torch.as_tensor(self.asif.similarity(image[rows], text[rows])).float().cpu()
        label_sim = self._side(image[rows], "image") @ self._side(text[rows], "text").T
        self.label_scale_ = asif_sim.std().item() / max(label_sim.std().item(), 1e-12)
        fused = asif_sim + self.weight * self.label_scale_ * label_sim
        self.scale_ = asif_sim.std().item() / max(fused.std().item(), 1e-12)
        return self

    def refit(self, anchors: Any, **asif_params: Any) -> "LabelBridge":
        """The same bridge over other anchors: a new ASIF with these settings (the wrapped one's
        where not given), fitted on ``anchors``, and the bridge fitted again."""
        from nofree.anchors.asif import ASIF

        asif = ASIF(**{**self.asif.get_params(), **asif_params}).fit(anchors)
        return LabelBridge(asif, self.head, self.label_emb, weight=self.weight,
                           temperature=self.temperature).fit(anchors)

    def _label_view(self, image_emb: Tensor) -> Tensor:
        return label_view(image_emb, self.head.weight, self.label_emb, self.temperature)

    def _side(self, emb: Tensor, modality: str) -> Tensor:
        emb = torch.as_tensor(emb).float().cpu()
        if modality == "image":
            return l2_normalize(self._label_view(emb) - self.image_centre_)
        return l2_normalize(l2_normalize(emb) - self.text_centre_)

    def transform(self, emb: Any, *, modality: str) -> Bridged:
        """The ASIF relative representation and the label-bridge side of ``emb (n, D)``."""
        from nofree.anchors.relative import SparseRelative

        if isinstance(emb, Bridged):
            return emb
        if isinstance(emb, SparseRelative):
            raise DataError("a label bridge compares embeddings, or what its own transform() returned for "
                            "them; this is a bare ASIF relative representation: pass the embeddings instead")
        return Bridged(self.asif.transform(emb, modality=modality), self._side(emb, modality))

    def label_similarity(self, image_emb: Any, text_emb: Any) -> Tensor:
        """``(n_images, n_texts)`` the label term alone: cos(v(x) − m_v, y − m_y)."""
        image, text = self.transform(image_emb, modality="image"), self.transform(text_emb, modality="text")
        return image.side @ text.side.T

    def similarity(self, image_emb: Any, text_emb: Any) -> Tensor:
        """``(n_images, n_texts)`` c·(s_ASIF + λ·(σ_ASIF/σ_label)·label term). Either side may be
        embeddings or the :class:`Bridged` that :meth:`transform` gave for them."""
        image, text = self.transform(image_emb, modality="image"), self.transform(text_emb, modality="text")
        asif_sim = torch.as_tensor(self.asif.similarity(image.rel, text.rel)).float().cpu()
        return self.scale_ * (asif_sim + self.weight * self.label_scale_ * (image.side @ text.side.T))

    def hubness(self, emb: Any, modality: str) -> Tensor:
        """The wrapped ASIF's CSLS r(q) (of the ASIF term)."""
        return self.asif.hubness(emb.rel if isinstance(emb, Bridged) else emb, modality)


def bridge_for(asif: Any, anchors: Any, image_encoder: Any, text_encoder: Any, *, encode_texts: Any = None,
               weight: float | None = None, temperature: float | None = None) -> Any:
    """``asif`` with the label bridge of ``image_encoder``'s classifier head, fitted on ``anchors``;
    ``asif`` itself when the encoder has no head or ``weight`` is 0. ``encode_texts`` (default: the
    text encoder's ``encode``) embeds the class names, e.g. through an embedding cache."""
    weight = LABEL_DEFAULTS["weight"] if weight is None else weight
    temperature = LABEL_DEFAULTS["temperature"] if temperature is None else temperature
    check_label_params(weight, temperature)
    head_of = getattr(image_encoder, "classifier_head", None)
    head = head_of() if callable(head_of) else None
    if head is None or weight == 0:
        return asif
    encode = encode_texts or text_encoder.encode
    label_emb = l2_normalize(torch.as_tensor(encode([LABEL_TEMPLATE.format(n) for n in head.names])).float())
    return LabelBridge(asif, head, label_emb, weight=weight, temperature=temperature).fit(anchors)
