"""A ready ASIF model: an anchor set, its two frozen encoders and the fitted estimator.

``AsifPipeline`` is the composed image–text model every ASIF task uses: zero-shot
classification (Norelli et al., 2022, §4: the nearest class prompt wins), retrieval in both
directions and caption retrieval. It checks that the encoders are the ones that built the
anchors, and reuses an :class:`~nofree.cache.EmbeddingCache` when given one so repeated runs do
not re-encode the same images or texts.

Many images: ``iter_encode_images`` embeds image paths a batch at a time and yields each batch
when it is done, so the task functions below (``iter_classify_paths``, ``iter_search_texts``)
can hand out results as they finish. One rule for unreadable images: they are skipped, reported
once at the end (count and the first few paths, via ``logging``) and named in their rows;
``strict=True`` raises the first one's ``DataError`` instead.

The task functions take any joint image–text space with the pipeline's interface, e.g. a trained
LiT's :class:`~nofree.scoring.ScorerSpace` (``nofree classify / retrieve --lit DIR``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from nofree.anchors.anchor_set import AnchorSet
from nofree.anchors.asif import ASIF, ASIF_DEFAULTS
from nofree.core import DataError, Encoder, Option, OptionError

DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: Prompt ensemble for ``average_templates`` (a short subset in the spirit of CLIP's 80).
ENSEMBLE_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image showing a {}.",
                      "a close-up photo of a {}.", "a photo of the {} in a scene.",
                      "there is a {} in this photo.")


class EncodedBatch(NamedTuple):
    """One batch of :meth:`AsifPipeline.iter_encode_images`.

    paths:     the batch's image paths, in input order
    image_emb: ``(n_readable, Di)`` embeddings of the readable ones, in input order
    errors:    ``{position in paths: reason}`` for each image that could not be read
    """

    paths: list[str]
    image_emb: Tensor
    errors: dict[int, str]


@dataclass
class AsifPipeline:
    """Anchors + encoders + ASIF. Embeddings in, ``(n_images, n_texts)`` similarities out.

    The similarities are the fitted :class:`~nofree.anchors.asif.ASIF`'s, with its settings
    (nofree's defaults, :data:`~nofree.anchors.asif.ASIF_DEFAULTS`, unless told otherwise): the
    same numbers as ``ASIF().fit(anchors).similarity(...)``, plus the image encoder's label bridge
    when it has a classifier head (``asif`` is then a :class:`~nofree.anchors.labels.LabelBridge`
    around the ASIF; :meth:`from_anchors`).
    """

    anchors: AnchorSet
    asif: Any
    image_encoder: Encoder
    text_encoder: Encoder
    cache: Any = None
    batch_size: int = 32

    @property
    def csls(self) -> int:
        """CSLS neighbours of the fitted ASIF (0: plain ASIF similarity)."""
        return int(getattr(self.asif, "csls", 0))

    @classmethod
    def load(cls, anchor_dir: str | Path, *, device: Any = None, cache: Any = None,
             image_encoder: Encoder | None = None, text_encoder: Encoder | None = None,
             **asif_params: Any) -> "AsifPipeline":
        """Load the set at ``anchor_dir`` (a folder or ``hf-hub:ORG/NAME[@REVISION]``), its recorded
        encoders, and fit ASIF(**asif_params) (label-bridge keywords: :meth:`from_anchors`)."""
        from nofree.hub import resolve_dir
        from nofree.registry import load_encoder

        anchor_dir = resolve_dir(anchor_dir, what="anchor set")
        anchors = AnchorSet.load(anchor_dir)
        image_encoder = image_encoder or load_encoder(anchors.image_spec, modality="image", device=device)
        text_encoder = text_encoder or load_encoder(anchors.text_spec, modality="text", device=device)
        indexes = None
        if asif_params.get("search") == "index":  # the set's optional faiss index (anchors index)
            from nofree.anchors.search.index import load_indexes

            indexes = load_indexes(anchor_dir)
            index_center = anchors.meta.get("index", {}).get("center", ASIF_DEFAULTS["center"])
            asif_params.setdefault("center", index_center)
        return cls.from_anchors(anchors, image_encoder, text_encoder, cache=cache, indexes=indexes,
                                **asif_params)

    @classmethod
    def from_anchors(cls, anchors: AnchorSet, image_encoder: Encoder, text_encoder: Encoder, *,
                     cache: Any = None, indexes: dict | None = None, csls: int | None = None,
                     label_weight: float | None = None, label_temperature: float | None = None,
                     **asif_params: Any) -> "AsifPipeline":
        """``asif_params`` (and ``csls``: CSLS neighbours, 0 = plain ASIF similarity) go to
        :class:`~nofree.anchors.asif.ASIF`; what is not given keeps ASIF's defaults.

        When the image encoder has a classifier head, its label bridge is added to the ASIF
        similarity (:mod:`nofree.anchors.labels`; ``label_weight`` λ and ``label_temperature``,
        nofree's defaults when not given; ``label_weight=0`` keeps plain ASIF)."""
        from nofree.anchors.labels import bridge_for

        anchors.check_encoder(image_encoder, "image")
        anchors.check_encoder(text_encoder, "text")
        if csls is not None:
            asif_params["csls"] = csls
        pipeline = cls(anchors, None, image_encoder, text_encoder, cache)
        asif = ASIF(**asif_params).fit(anchors, indexes=indexes)
        pipeline.asif = bridge_for(asif, anchors, image_encoder, text_encoder, encode_texts=pipeline.encode_texts,
                                   weight=label_weight, temperature=label_temperature)
        return pipeline

    @property
    def label_settings(self) -> dict[str, float]:
        """``{"label_weight": λ, "label_temperature": t}`` of the label bridge in use (weight 0:
        plain ASIF), the keywords that rebuild it with :meth:`from_anchors`."""
        from nofree.anchors.labels import LabelBridge

        if isinstance(self.asif, LabelBridge):
            return {"label_weight": self.asif.weight, "label_temperature": self.asif.temperature}
        return {"label_weight": 0.0}

    # --- embeddings ---------------------------------------------------------------------
    def _encode(self, encoder: Encoder, items: Sequence[Any]) -> Tensor:
        if self.cache is not None:
            return self.cache.encode(encoder, list(items), batch_size=self.batch_size)
        return encoder.encode(list(items), batch_size=self.batch_size)

    def encode_images(self, images: Sequence[Any]) -> Tensor:
        """``(N, Di)`` embeddings of image paths or PIL images (paths are read here)."""
        from nofree.cache import encode_images

        return encode_images(self.image_encoder, images, cache=self.cache, batch_size=self.batch_size)

    def iter_encode_images(self, paths: Sequence[str | Path], *, strict: bool = False,
                           ) -> Iterator[EncodedBatch]:
        """Embed image paths ``batch_size`` at a time, yielding each batch as it is done
        (:func:`iter_encode_images`)."""
        return iter_encode_images(self, paths, strict=strict)

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """``(N, Dt)`` embeddings of texts."""
        return self._encode(self.text_encoder, texts)

    def similarity(self, image_emb: Any, text_emb: Any) -> Tensor:
        """ASIF similarity ``(n_images, n_texts)`` of already-encoded images and texts (CSLS-
        corrected when the ASIF's ``csls`` > 0; :meth:`ASIF.similarity`). Either side may also be
        the relative representation ``asif.transform`` gave for it (to reuse a caption pool's)."""
        return torch.as_tensor(self.asif.similarity(image_emb, text_emb))

    # --- tasks --------------------------------------------------------------------------
    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                         ) -> tuple[Tensor, Tensor]:
        """Prompt embeddings ``(C·P, Dt)`` and each prompt's class index ``(C·P,)``."""
        prompts = class_prompts(labels, templates)
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
        return _class_scores(self.similarity(image_emb, prompt_emb), len(labels), average_templates)


# --- the tasks, over an AsifPipeline or any joint space with its interface ----------------------
# ``pipeline`` below: an AsifPipeline, or another joint image–text space offering ``encode_texts``,
# ``similarity(image_emb, text_emb)`` and ``image_encoder`` / ``cache`` / ``batch_size`` for the
# images, e.g. a trained LiT's :class:`~nofree.scoring.ScorerSpace` (``nofree classify --lit``).

def iter_encode_images(pipeline: Any, paths: Sequence[str | Path], *, strict: bool = False,
                       ) -> Iterator[EncodedBatch]:
    """Embed image paths with ``pipeline.image_encoder``, ``pipeline.batch_size`` at a time,
    yielding each batch as it is done.

    With a cache (``pipeline.cache``), finished embeddings are kept there (written by size and
    age, and when the iteration ends, fails or is interrupted), so a re-run encodes only what was
    not done. Unreadable images are skipped, listed in each batch's ``errors`` and reported once
    at the end; ``strict=True`` raises the first one's ``DataError`` (naming the file) instead.
    """
    from nofree.data.images import load_image, report_skipped

    skipped: list[str] = []
    try:
        for start in range(0, len(paths), pipeline.batch_size):
            chunk = [str(path) for path in paths[start:start + pipeline.batch_size]]
            errors: dict[int, str] = {}
            try:
                image_emb = _encode_paths(pipeline, chunk)
            except DataError as first:
                if strict:
                    raise
                for position, path in enumerate(chunk):  # find the unreadable ones
                    try:
                        load_image(path)
                    except DataError as err:
                        errors[position] = str(err)
                if not errors:  # not an unreadable image: a real error
                    raise first
                image_emb = _encode_paths(pipeline, [p for i, p in enumerate(chunk) if i not in errors])
                skipped += [chunk[i] for i in errors]
            yield EncodedBatch(chunk, image_emb, errors)
    finally:
        if pipeline.cache is not None:
            pipeline.cache.flush()
        report_skipped(skipped)


def _encode_paths(pipeline: Any, paths: list[str]) -> Tensor:
    """``(N, Di)`` embeddings of readable image paths; the cache keeps them unflushed."""
    from nofree.data.images import load_image

    encoder, batch_size = pipeline.image_encoder, pipeline.batch_size
    if not paths:
        return torch.zeros(0, encoder.embed_dim)
    if pipeline.cache is not None:
        return pipeline.cache.encode(encoder, paths, batch_size=batch_size, flush=False)
    return encoder.encode([load_image(p) for p in paths], batch_size=batch_size)


def class_prompts(labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """The ``C·P`` prompts of ``labels`` (each label's ``P`` templates together, in order)."""
    if not labels:
        raise OptionError("no class labels given: pass at least one in ", Option("labels"))
    for template in templates:
        if "{}" not in template:
            raise DataError(f"prompt template {template!r} has no '{{}}' where the label goes")
    return [template.format(label) for label in labels for template in templates]


def _texts_once(pipeline: Any, text_emb: Tensor) -> Any:
    """What ``pipeline.similarity`` compares with ``text_emb`` by, computed once for every batch:
    ASIF relative representations, or the embeddings themselves in another joint space."""
    asif = getattr(pipeline, "asif", None)
    return asif.transform(text_emb, modality="text") if asif is not None else text_emb


def _class_scores(sim: Tensor, n_labels: int, average_templates: bool) -> Tensor:
    """Class scores ``(n, C)`` from prompt similarities ``(n, C·P)`` (prompts grouped by class)."""
    sim = sim.view(sim.shape[0], n_labels, -1)
    return sim.mean(-1) if average_templates else sim.amax(-1)


def iter_classify_paths(pipeline: Any, paths: Sequence[str | Path], labels: Sequence[str], *,
                        templates: Sequence[str] = DEFAULT_TEMPLATES, average_templates: bool = False,
                        top: int = 5, strict: bool = False, temperature: float | None = None,
                        ) -> Iterator[dict]:
    """Zero-shot classify image files, one row per image in input order, yielded batch by batch
    as each is done: ``{"image": path, "top": [{"label": l, "score": s}, ...]}`` (the ``top``
    best classes, as :meth:`AsifPipeline.classify` scores them), or for an unreadable image
    ``{"image": path, "top": None, "error": reason}`` (``strict``: its ``DataError`` instead).

    ``temperature`` τ: rows also carry ``"probabilities": {label: p, ...}`` over every label (in
    label order), ``softmax(scores / τ)`` (:func:`nofree.anchors.calibration.class_probabilities`;
    :func:`~nofree.anchors.calibration.choose_temperature` picks τ for ASIF scores).
    """
    from nofree.anchors.calibration import check_temperature, class_probabilities

    if temperature is not None:
        check_temperature(temperature)
    prompt_rel = _texts_once(pipeline, pipeline.encode_texts(class_prompts(labels, templates)))
    for batch in iter_encode_images(pipeline, paths, strict=strict):
        scores = _class_scores(pipeline.similarity(batch.image_emb, prompt_rel), len(labels),
                               average_templates)                                          # (n, C)
        ranked = iter(top_k_rows(scores, labels, top) if len(batch.image_emb) else [])
        probabilities = iter([] if temperature is None else class_probabilities(scores, temperature).tolist())
        for position, path in enumerate(batch.paths):
            if position in batch.errors:
                yield {"image": path, "top": None, "error": batch.errors[position]}
            elif temperature is None:
                yield {"image": path, "top": next(ranked)}
            else:
                yield {"image": path, "top": next(ranked),
                       "probabilities": {label: round(p, 6) for label, p in zip(labels, next(probabilities))}}


def search_images(pipeline: Any, queries: Sequence[str], paths: Sequence[str | Path], *,
                  top: int = 5, strict: bool = False) -> list[dict]:
    """Text-to-image retrieval over image files: ``[{"query": q, "results": [{"image": path,
    "score": s}, ...]}, ...]``, the ``top`` best readable images per query (unreadable ones are
    skipped and reported; ``strict``: the first raises its ``DataError``)."""
    readable: list[str] = []
    parts: list[Tensor] = []
    for batch in iter_encode_images(pipeline, paths, strict=strict):
        readable += [path for position, path in enumerate(batch.paths) if position not in batch.errors]
        parts.append(batch.image_emb)
    if not readable:
        raise DataError(f"none of the {len(paths)} target images could be read; check the paths")
    sim = pipeline.similarity(torch.cat(parts), pipeline.encode_texts(list(queries)))
    return [{"query": query, "results": hits}
            for query, hits in zip(queries, top_k_rows(sim.T, readable, top, key="image"))]


def iter_search_texts(pipeline: Any, image_queries: Sequence[str | Path], texts: Sequence[str], *,
                      top: int = 5, strict: bool = False) -> Iterator[dict]:
    """Image-to-text retrieval over ``texts``, one row per query image in input order, yielded
    batch by batch as each is done: ``{"query": path, "results": [{"caption": t, "score": s},
    ...]}``, or for an unreadable image ``{"query": path, "results": None, "error": reason}``
    (``strict``: its ``DataError`` instead)."""
    text_rel = _texts_once(pipeline, pipeline.encode_texts(list(texts)))
    for batch in iter_encode_images(pipeline, image_queries, strict=strict):
        ranked = iter(top_k_rows(pipeline.similarity(batch.image_emb, text_rel), texts, top, key="caption")
                      if len(batch.image_emb) else [])
        for position, path in enumerate(batch.paths):
            if position in batch.errors:
                yield {"query": path, "results": None, "error": batch.errors[position]}
            else:
                yield {"query": path, "results": next(ranked)}


def top_k_rows(scores: Tensor, names: Sequence[str], k: int, *, key: str = "label") -> list[list[dict]]:
    """For each row of ``scores (n, m)``, the top ``k`` as ``[{key: name, "score": s}, ...]``."""
    k = min(k, scores.shape[1])
    values, index = scores.topk(k, dim=1)
    return [[{key: names[j], "score": round(float(v), 6)} for v, j in zip(vr.tolist(), ir.tolist())]
            for vr, ir in zip(values, index)]
