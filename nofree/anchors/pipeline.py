"""A ready ASIF model: an anchor set, its two frozen encoders and the fitted estimator.

``AsifPipeline`` is the composed image–text model every ASIF task uses: zero-shot
classification (Norelli et al., 2022, §4: the nearest class prompt wins), retrieval in both
directions and caption retrieval. It checks that the encoders are the ones that built the
anchors, and reuses an :class:`~nofree.cache.EmbeddingCache` when given one so repeated runs do
not re-encode the same images or texts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.anchors.anchor_set import AnchorSet
from nofree.core import DataError, Encoder

#: ASIF settings nofree uses unless told otherwise: the paper's top-k with k = min(800, N), plus
#: centring each modality on its anchor mean and a milder power than the paper's p = 8. Chosen
#: by 5-fold cross-validation on coco-mini train (benchmarks/asif_quality.py, RESULTS.md).
PIPELINE_ASIF_DEFAULTS = {"center": True, "p": 2.0}
#: CSLS hubness correction (Lample et al., 2018, "Word translation without parallel data"):
#: neighbours averaged per query, and the most anchors of the other modality used as its
#: reference set (a seeded random subset beyond that). Chosen by the same cross-validation.
PIPELINE_CSLS = 10
CSLS_REFERENCE = 10_000
DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: Prompt ensemble for ``average_templates`` (a short subset in the spirit of CLIP's 80).
ENSEMBLE_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image showing a {}.",
                      "a close-up photo of a {}.", "a photo of the {} in a scene.",
                      "there is a {} in this photo.")


@dataclass
class AsifPipeline:
    """Anchors + encoders + ASIF. Embeddings in, ``(n_images, n_texts)`` similarities out."""

    anchors: AnchorSet
    asif: Any
    image_encoder: Encoder
    text_encoder: Encoder
    cache: Any = None
    batch_size: int = 32
    csls: int = PIPELINE_CSLS

    def __post_init__(self) -> None:
        self._reference: dict[str, Any] = {}
        self._hubness: dict[int, tuple[Any, Tensor]] = {}

    @classmethod
    def load(cls, anchor_dir: str | Path, *, device: Any = None, cache: Any = None,
             image_encoder: Encoder | None = None, text_encoder: Encoder | None = None,
             **asif_params: Any) -> "AsifPipeline":
        """Load the set at ``anchor_dir``, its recorded encoders, and fit ASIF(**asif_params)."""
        from nofree.anchors.asif import ASIF
        from nofree.registry import load_encoder

        anchors = AnchorSet.load(anchor_dir)
        image_encoder = image_encoder or load_encoder(anchors.image_spec, modality="image", device=device)
        text_encoder = text_encoder or load_encoder(anchors.text_spec, modality="text", device=device)
        indexes = None
        if asif_params.get("search") == "index":  # the set's optional faiss index (anchors index)
            from nofree.anchors.index import load_indexes

            indexes = load_indexes(anchor_dir)
            asif_params.setdefault("center", anchors.meta.get("index", {}).get("center", True))
        return cls.from_anchors(anchors, image_encoder, text_encoder, cache=cache, indexes=indexes,
                                **asif_params)

    @classmethod
    def from_anchors(cls, anchors: AnchorSet, image_encoder: Encoder, text_encoder: Encoder, *,
                     cache: Any = None, indexes: dict | None = None, csls: int | None = None,
                     **asif_params: Any) -> "AsifPipeline":
        """``csls``: CSLS neighbours (``None``: nofree's default, 0: plain ASIF similarity)."""
        from nofree.anchors.asif import ASIF

        anchors.check_encoder(image_encoder, "image")
        anchors.check_encoder(text_encoder, "text")
        params = {**PIPELINE_ASIF_DEFAULTS, **asif_params}
        csls = PIPELINE_CSLS if csls is None else int(csls)
        if csls < 0:
            raise DataError(f"csls must be >= 0 neighbours (0 turns CSLS off), got {csls}")
        return cls(anchors, ASIF(**params).fit(anchors, indexes=indexes), image_encoder, text_encoder, cache,
                   csls=csls)

    # --- embeddings ---------------------------------------------------------------------
    def _encode(self, encoder: Encoder, items: Sequence[Any]) -> Tensor:
        if self.cache is not None:
            return self.cache.encode(encoder, list(items), batch_size=self.batch_size)
        return encoder.encode(list(items), batch_size=self.batch_size)

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """``(N, Di)`` embeddings of image paths or PIL images (paths are read here)."""
        from nofree.data.images import load_image

        if self.cache is not None and all(isinstance(x, (str, Path)) for x in images):
            return self.cache.encode(self.image_encoder, [str(x) for x in images],
                                     batch_size=self.batch_size)
        loaded = [load_image(x) if isinstance(x, (str, Path)) else x for x in images]
        return self.image_encoder.encode(loaded, batch_size=self.batch_size)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``(N, Dt)`` embeddings of texts."""
        return self._encode(self.text_encoder, texts)

    def similarity(self, image_emb: Any, text_emb: Any) -> Tensor:
        """ASIF similarity ``(n_images, n_texts)`` of already-encoded images and texts, CSLS-
        corrected when ``csls`` > 0: ``2·s(x, y) − r(x) − r(y)``. Either side may also be the
        relative representation ``asif.transform`` gave for it (to reuse a caption pool's)."""
        sim = torch.as_tensor(self.asif.similarity(image_emb, text_emb))
        if not self.csls:
            return sim
        return 2 * sim - self.hubness(image_emb, "image")[:, None] - self.hubness(text_emb, "text")[None, :]

    def hubness(self, emb: Any, modality: str) -> Tensor:
        """CSLS r(q) ``(n,)``: the mean of the ``csls`` highest ASIF similarities of each query (of
        ``modality``) to the other modality's anchors (at most ``CSLS_REFERENCE`` of them)."""
        from nofree.anchors.relative import SparseRelative

        if isinstance(emb, SparseRelative) and id(emb) in self._hubness:   # e.g. a caption pool's
            return self._hubness[id(emb)][1]
        other = "text" if modality == "image" else "image"
        if other not in self._reference:
            side = self.anchors.text if other == "text" else self.anchors.image
            if len(side) > CSLS_REFERENCE:
                side = side[torch.randperm(len(side), generator=torch.Generator().manual_seed(0))[:CSLS_REFERENCE]]
            self._reference[other] = self.asif.transform(side, modality=other)
        reference = self._reference[other]
        if modality == "image":
            sim = torch.as_tensor(self.asif.similarity(emb, reference))        # (n, R)
        else:
            sim = torch.as_tensor(self.asif.similarity(reference, emb)).T      # (n, R)
        r = sim.topk(min(self.csls, sim.shape[1]), dim=1).values.mean(1)
        if isinstance(emb, SparseRelative):
            self._hubness[id(emb)] = (emb, r)  # keeps emb alive, so its id stays its own
        return r

    # --- tasks --------------------------------------------------------------------------
    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                         ) -> tuple[Tensor, Tensor]:
        """Prompt embeddings ``(C·P, Dt)`` and each prompt's class index ``(C·P,)``."""
        if not labels:
            raise DataError("no class labels given: pass --labels FILE or --label NAME (repeatable)")
        for template in templates:
            if "{}" not in template:
                raise DataError(f"prompt template {template!r} has no '{{}}' where the label goes")
        prompts = [template.format(label) for label in labels for template in templates]
        owner = torch.arange(len(labels)).repeat_interleave(len(templates))
        return self.encode_texts(prompts), owner

    def classify(self, image_emb: Tensor, labels: Sequence[str], *,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, average_templates: bool = False,
                 ) -> Tensor:
        """Zero-shot class scores ``(n_images, C)``.

        As in the paper, each class scores as its nearest prompt (max over templates); with
        ``average_templates`` the score is the mean over the class's prompts instead.
        """
        prompt_emb, owner = self.class_embeddings(labels, templates)
        sim = self.similarity(image_emb, prompt_emb).view(len(image_emb), len(labels), len(templates))
        return sim.mean(-1) if average_templates else sim.amax(-1)


def top_k_rows(scores: Tensor, names: Sequence[str], k: int, *, key: str = "label") -> list[list[dict]]:
    """For each row of ``scores (n, m)``, the top ``k`` as ``[{key: name, "score": s}, ...]``."""
    k = min(k, scores.shape[1])
    values, index = scores.topk(k, dim=1)
    return [[{key: names[j], "score": round(float(v), 6)} for v, j in zip(vr.tolist(), ir.tolist())]
            for vr, ir in zip(values, index)]
