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
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

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

    def iter_encode_images(self, paths: Sequence[str | Path], *, strict: bool = False,
                           ) -> Iterator[EncodedBatch]:
        """Embed image paths ``batch_size`` at a time, yielding each batch as it is done.

        With a cache, finished embeddings are kept there (written by size and age, and when the
        iteration ends, fails or is interrupted), so a re-run encodes only what was not done.
        Unreadable images are skipped, listed in each batch's ``errors`` and reported once at
        the end; ``strict=True`` raises the first one's ``DataError`` (naming the file) instead.
        """
        from nofree.data.images import load_image, report_skipped

        skipped: list[str] = []
        try:
            for start in range(0, len(paths), self.batch_size):
                chunk = [str(path) for path in paths[start:start + self.batch_size]]
                errors: dict[int, str] = {}
                try:
                    image_emb = self._encode_paths(chunk)
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
                    image_emb = self._encode_paths([p for i, p in enumerate(chunk) if i not in errors])
                    skipped += [chunk[i] for i in errors]
                yield EncodedBatch(chunk, image_emb, errors)
        finally:
            if self.cache is not None:
                self.cache.flush()
            report_skipped(skipped)

    def _encode_paths(self, paths: list[str]) -> Tensor:
        """``(N, Di)`` embeddings of readable image paths; the cache keeps them unflushed."""
        from nofree.data.images import load_image

        if not paths:
            return torch.zeros(0, self.image_encoder.embed_dim)
        if self.cache is not None:
            return self.cache.encode(self.image_encoder, paths, batch_size=self.batch_size, flush=False)
        return self.image_encoder.encode([load_image(p) for p in paths], batch_size=self.batch_size)

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
        return _class_scores(self.similarity(image_emb, prompt_emb), len(labels), average_templates)


def _class_scores(sim: Tensor, n_labels: int, average_templates: bool) -> Tensor:
    """Class scores ``(n, C)`` from prompt similarities ``(n, C·P)`` (prompts grouped by class)."""
    sim = sim.view(sim.shape[0], n_labels, -1)
    return sim.mean(-1) if average_templates else sim.amax(-1)


def iter_classify_paths(pipeline: AsifPipeline, paths: Sequence[str | Path], labels: Sequence[str], *,
                        templates: Sequence[str] = DEFAULT_TEMPLATES, average_templates: bool = False,
                        top: int = 5, strict: bool = False) -> Iterator[dict]:
    """Zero-shot classify image files, one row per image in input order, yielded batch by batch
    as each is done: ``{"image": path, "top": [{"label": l, "score": s}, ...]}`` (the ``top``
    best classes, as :meth:`AsifPipeline.classify` scores them), or for an unreadable image
    ``{"image": path, "top": None, "error": reason}`` (``strict``: its ``DataError`` instead).
    """
    prompt_emb, _ = pipeline.class_embeddings(labels, templates)
    prompt_rel = pipeline.asif.transform(prompt_emb, modality="text")  # once, for every batch
    for batch in pipeline.iter_encode_images(paths, strict=strict):
        ranked = iter(top_k_rows(_class_scores(pipeline.similarity(batch.image_emb, prompt_rel), len(labels),
                                               average_templates), labels, top)
                      if len(batch.image_emb) else [])
        for position, path in enumerate(batch.paths):
            if position in batch.errors:
                yield {"image": path, "top": None, "error": batch.errors[position]}
            else:
                yield {"image": path, "top": next(ranked)}


def search_images(pipeline: AsifPipeline, queries: Sequence[str], paths: Sequence[str | Path], *,
                  top: int = 5, strict: bool = False) -> list[dict]:
    """Text-to-image retrieval over image files: ``[{"query": q, "results": [{"image": path,
    "score": s}, ...]}, ...]``, the ``top`` best readable images per query (unreadable ones are
    skipped and reported; ``strict``: the first raises its ``DataError``)."""
    readable: list[str] = []
    parts: list[Tensor] = []
    for batch in pipeline.iter_encode_images(paths, strict=strict):
        readable += [path for position, path in enumerate(batch.paths) if position not in batch.errors]
        parts.append(batch.image_emb)
    if not readable:
        raise DataError(f"none of the {len(paths)} target images could be read; check the paths")
    sim = pipeline.similarity(torch.cat(parts), pipeline.encode_texts(list(queries)))
    return [{"query": query, "results": hits}
            for query, hits in zip(queries, top_k_rows(sim.T, readable, top, key="image"))]


def iter_search_texts(pipeline: AsifPipeline, image_queries: Sequence[str | Path], texts: Sequence[str], *,
                      top: int = 5, strict: bool = False) -> Iterator[dict]:
    """Image-to-text retrieval over ``texts``, one row per query image in input order, yielded
    batch by batch as each is done: ``{"query": path, "results": [{"caption": t, "score": s},
    ...]}``, or for an unreadable image ``{"query": path, "results": None, "error": reason}``
    (``strict``: its ``DataError`` instead)."""
    text_rel = pipeline.asif.transform(pipeline.encode_texts(list(texts)), modality="text")
    for batch in pipeline.iter_encode_images(image_queries, strict=strict):
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
