"""Retrieval captioning: each image gets the best caption of a text pool, re-ranked by consensus.

:class:`RetrievalCaptioner` picks, for each image, a caption from a pool of candidate captions
by image–text similarity (ASIF, or the cosine of a CLIP-like scorer), then re-ranks the top
``m`` candidates by *consensus* with the other retrieved captions (Devlin et al., 2015,
"Exploring Nearest Neighbor Approaches for Image Captioning": choose the caption most similar
to its neighbours): by CIDEr-D against the top retrieved captions (the default) or by mean cosine
in the text encoder's space (:mod:`nofree.captioning.consensus`). The pool's embeddings and ASIF
relative representations are computed once. Its rankings also feed the drafts of
:class:`~nofree.captioning.drafts.MagicCaptioner` and SmallCap's retrieved examples.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch
from torch import Tensor

from nofree.captioning.consensus import CiderD, consensus_scores
from nofree.core import DataError, Option, OptionError, l2_normalize

log = logging.getLogger(__name__)


#: How RetrievalCaptioner re-ranks its top candidates, and the default m for each (5-fold
#: cross-validation on coco-mini ``train`` by benchmarks/magic_quality.py, in benchmarks/RESULTS.md:
#: CIDEr-D consensus over the top 50 with 50 pseudo-references 52.0, embedding consensus over the
#: top 100 47.2).
CONSENSUS_RERANK = {"cider": 50, "embedding": 100}


def _rerank_depth(consensus: str, rerank: int | None) -> int:
    """``rerank``, or the default m of ``consensus``; an unknown consensus is a clear error."""
    if consensus not in CONSENSUS_RERANK:
        raise DataError(f"consensus must be one of {tuple(CONSENSUS_RERANK)}, got {consensus!r}")
    return CONSENSUS_RERANK[consensus] if rerank is None else rerank


class RetrievalCaptioner:
    """Caption images with the best pool caption under an ASIF pipeline (or a CLIP-like scorer).

    ``pipeline`` is the joint image–text space that ranks the pool: an
    :class:`~nofree.anchors.pipeline.AsifPipeline` (ASIF similarity), or a
    :class:`~nofree.scoring.ScorerSpace` (the cosine of a CLIP-like model or a LiT: CLIPRe);
    "ASIF" below means whichever it is.

    ``pool`` is a list of candidate captions (e.g. ``caption_corpus.txt``; never the evaluation
    references). ``rerank`` is the number m of top candidates (by ASIF similarity) re-ranked by
    consensus (0 or 1 = plain argmax of the ASIF similarity; default :data:`CONSENSUS_RERANK`).
    ``consensus="cider"`` scores each candidate by CIDEr-D against the top ``references``
    retrieved captions (leaving itself out; n-gram weights from the pool), ``"embedding"`` by its
    mean text-encoder cosine to the other candidates, mixed with the ASIF score by
    ``consensus_weight`` (see :func:`consensus_scores`).

    ``clean_pool=True`` (default) first drops the pool's non-captions, too short or too long
    lines and repeats (:func:`nofree.data.pool.filter_pool`; one warning says how many and why),
    so ``self.pool`` may be shorter than ``pool``; ``False`` keeps every line as given.
    """

    def __init__(self, pipeline: Any, pool: Sequence[str], *, rerank: int | None = None,
                 consensus: str = "cider", references: int = 50, consensus_weight: float = 1.0,
                 chunk: int = 4096, clean_pool: bool = True) -> None:
        cleaned = ""
        if clean_pool:
            from nofree.data.pool import filter_pool

            found = filter_pool(pool)
            if found.n_dropped:
                cleaned = found.summary()
                log.warning("caption pool: %s as non-captions or repeats (--raw-pool / clean_pool=False "
                            "keeps every line)", cleaned)
            pool = found.captions
        if len(pool) == 0:
            raise OptionError("the caption pool is empty" + (f" after cleaning ({cleaned})" if cleaned else ""),
                              ": give ", Option("pool"), " at least one caption")
        rerank = _rerank_depth(consensus, rerank)
        if rerank < 0 or references < 1:
            raise DataError(f"rerank must be >= 0 and references >= 1, got {rerank} and {references}")
        self.pipeline = pipeline
        self.pool = list(pool)
        self.rerank = min(rerank, len(self.pool))
        self.consensus, self.references = consensus, min(references, len(self.pool))
        self.consensus_weight = consensus_weight
        self.chunk = chunk
        self._cider = None
        self.pool_emb = l2_normalize(pipeline.encode_texts(self.pool))  # (P, Dt)
        asif = getattr(pipeline, "asif", None)  # ASIF: the pool's relative representations, once
        self.pool_rel = asif.transform(self.pool_emb, modality="text") if asif is not None else self.pool_emb

    def with_consensus(self, consensus: str, rerank: int | None = None) -> "RetrievalCaptioner":
        """The same pool (embeddings and CIDEr-D n-gram weights shared, nothing re-encoded or
        re-counted) re-ranked another way."""
        if consensus == "cider":
            self.cider  # built here, before the copy, so that both rankings share one set of weights
        other = copy.copy(self)
        other.rerank = min(_rerank_depth(consensus, rerank), len(self.pool))
        other.consensus = consensus
        return other

    @property
    def cider(self) -> Any:
        """:class:`~nofree.captioning.consensus.CiderD` with n-gram weights from the pool (built once)."""
        if self._cider is None:
            self._cider = CiderD(self.pool)
        return self._cider

    def top(self, image_emb: Tensor, n: int) -> list[list[str]]:
        """Each image's ``n`` pool captions of highest ASIF similarity, best first (ties: pool order)."""
        sim = self.scores(image_emb)
        top = sim.argsort(dim=1, descending=True, stable=True)[:, :min(n, len(self.pool))]
        return [[self.pool[j] for j in row] for row in top.tolist()]

    def scores(self, image_emb: Tensor) -> Tensor:
        """ASIF similarity ``(B, P)`` of images to every pool caption (the pipeline's, CSLS included)."""
        return self.pipeline.similarity(image_emb, self.pool_rel)

    def ranked(self, image_emb: Tensor, m: int) -> list[list[str]]:
        """For each image ``(B, Di)``, its ``m`` best distinct pool captions, best first.

        Best means highest consensus among the top ``rerank`` pool captions by ASIF, then the
        rest in ASIF order (plain ASIF order when ``rerank`` <= 1); captions equal up to case and
        a final period count once.
        """
        sim = self.scores(image_emb)
        depth = min(max(self.rerank, m, self.references if self.consensus == "cider" else 0), len(self.pool))
        top = sim.argsort(dim=1, descending=True, stable=True)[:, :depth]   # ties: pool order
        top_scores = sim.gather(1, top)
        if self.rerank > 1 and self.consensus == "embedding":
            order = consensus_scores(top_scores[:, :self.rerank], self.pool_emb[top[:, :self.rerank]],
                                     weight=self.consensus_weight)
            top = torch.cat([top[:, :self.rerank].gather(1, order.argsort(dim=1, descending=True, stable=True)),
                             top[:, self.rerank:]], dim=1)
        elif self.rerank > 1:
            reordered = []
            for row in top.tolist():
                texts = [self.pool[j] for j in row]
                score = self.cider.scores(texts[:self.rerank], texts[:self.references])
                head = sorted(range(len(score)), key=lambda i: (-score[i], i))
                reordered.append([row[i] for i in head] + row[self.rerank:])
            top = torch.tensor(reordered, dtype=torch.long)
        out = []
        for row in top.tolist():
            chosen: dict[str, str] = {}
            for j in row:
                chosen.setdefault(self.pool[j].strip().rstrip(".").lower(), self.pool[j].strip())
                if len(chosen) == m:
                    break
            out.append(list(chosen.values()))
        return out

    def caption_embeddings(self, image_emb: Tensor) -> list[str]:
        """Captions for already-encoded images ``(B, Di)``."""
        return [row[0] for row in self.ranked(image_emb, 1)]

    def caption(self, images: Sequence[Any], **_: Any) -> list[str]:
        """One caption per image (paths or PIL images)."""
        return self.caption_embeddings(self.pipeline.encode_images(images))
