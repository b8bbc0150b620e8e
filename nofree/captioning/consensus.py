"""Consensus among candidate captions: keep the one that agrees most with the others.

Two measures of agreement, both from consensus re-ranking of retrieved captions (Devlin et al.
(2015), "Exploring Nearest Neighbor Approaches for Image Captioning": choose the caption most
similar to its neighbours):

- :class:`CiderD`, for minimum-Bayes-risk selection (Kumar & Byrne, 2004). A frozen LM prompted
  with different in-context examples writes several plausible captions; the one to keep is the
  candidate that agrees most, under CIDEr-D (Vedantam, Zitnick, Parikh (2015), "CIDEr:
  Consensus-based Image Description Evaluation"), with the captions that retrieval finds for the
  image, which stand in for the unknown references. No model is trained; the cost is one CIDEr-D
  per candidate. It follows the published definition: n-grams of 1 to 4 lower-cased words,
  TF-IDF vectors per n (document frequencies from a fixed text collection, e.g. the caption pool,
  so a caption's score never depends on which other images share its batch), the candidate's
  counts clipped to each reference's, a Gaussian length penalty (σ = 6), mean over n and
  references, × 10.
- :func:`consensus_scores`: the mean cosine of each candidate's text embedding to the other
  candidates', mixed with its image-text score.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

import torch
from torch import Tensor

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words (punctuation dropped), the unit of the n-grams."""
    return _WORD.findall(text.lower())


def ngram_counts(tokens: Sequence[str], n: int = 4) -> list[Counter]:
    """``[Counter of 1-grams, ..., Counter of n-grams]`` of a tokenised text."""
    return [Counter(tuple(tokens[i:i + m]) for i in range(len(tokens) - m + 1)) for m in range(1, n + 1)]


class CiderD:
    """CIDEr-D between a candidate and a set of references, with IDF from ``documents``.

    ``documents``: the texts whose n-gram document frequencies weight the n-grams (each text one
    document); an n-gram in none of them gets the largest weight, log(number of documents).
    """

    def __init__(self, documents: Iterable[str], *, n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma
        df: Counter = Counter()
        count = 0
        for text in documents:
            count += 1
            for grams in ngram_counts(words(text), n):
                df.update(grams.keys())
        if count == 0:
            raise ValueError("CiderD needs at least one document for its n-gram frequencies")
        self.df, self.log_docs = df, math.log(float(count))

    def _vector(self, text: str) -> tuple[list[dict], list[float], int]:
        tokens = words(text)
        vecs, norms = [], []
        for grams in ngram_counts(tokens, self.n):
            vec = {g: c * (self.log_docs - math.log(max(1.0, self.df.get(g, 0.0)))) for g, c in grams.items()}
            vecs.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vecs, norms, len(tokens)

    def _similarity(self, cand: tuple[list[dict], list[float], int],
                    ref: tuple[list[dict], list[float], int]) -> float:
        (cv, cn, clen), (rv, rn, rlen) = cand, ref
        sim = 0.0
        for n in range(self.n):
            if cn[n] == 0 or rn[n] == 0:
                continue
            ref_n = rv[n]
            dot = sum(min(v, ref_n[g]) * ref_n[g] for g, v in cv[n].items() if g in ref_n)
            sim += dot / (cn[n] * rn[n])
        return math.exp(-((clen - rlen) ** 2) / (2 * self.sigma ** 2)) * sim / self.n

    def score(self, candidate: str, references: Sequence[str]) -> float:
        """CIDEr-D of ``candidate`` against ``references`` (0 for no references)."""
        if not references:
            return 0.0
        cand = self._vector(candidate)
        return 10.0 * sum(self._similarity(cand, self._vector(r)) for r in references) / len(references)

    def scores(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        """Each candidate's CIDEr-D against ``references``, leaving out a reference with the same
        words as the candidate (a retrieved caption offered as a candidate does not vote for itself).
        """
        refs = [(words(r), self._vector(r)) for r in references]
        out = []
        for cand in candidates:
            own, vec = words(cand), self._vector(cand)
            sims = [self._similarity(vec, rv) for rw, rv in refs if rw != own]
            out.append(10.0 * sum(sims) / len(sims) if sims else 0.0)
        return out

    def choose(self, candidates: Sequence[str], references: Sequence[str]) -> int:
        """Index of the candidate with the highest :meth:`scores` (the first one on ties) among
        those that neither loop nor stutter (:func:`nofree.eval.degeneration.degenerate`), or among
        all when every one does. CIDEr-D clips repeated n-grams but still rewards a run-on draft
        for the many reference words it lists ("A woman in a kitchen, a kitchen, a blender, a
        person, a"), so a fault the evaluation counts is never preferred to a sound sentence."""
        from nofree.eval.degeneration import degenerate

        if not candidates:
            raise ValueError("no candidate captions to choose from")
        scores = self.scores(candidates, references)
        sound = [i for i, text in enumerate(candidates) if not degenerate(text)] or range(len(candidates))
        return max(sound, key=lambda i: (scores[i], -i))


def consensus_scores(asif_scores: Tensor, candidate_emb: Tensor, *, weight: float = 1.0) -> Tensor:
    """``(B, m)`` consensus score of each row's top-m candidates (higher is better).

    ``asif_scores`` ``(B, m)`` are the image–text scores of each row's top-m candidates and
    ``candidate_emb`` ``(B, m, Dt)`` their text embeddings (L2-normalised). The consensus of a
    candidate is its mean cosine to the row's other candidates; the score mixes it with the
    max-scaled ASIF score: ``weight·consensus + (1−weight)·score/max(score)``.
    """
    m = candidate_emb.shape[1]
    if m == 1:
        return torch.ones_like(asif_scores)
    cos = candidate_emb @ candidate_emb.transpose(1, 2)
    consensus = (cos.sum(-1) - cos.diagonal(dim1=1, dim2=2)) / (m - 1)
    scaled = asif_scores / asif_scores.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return weight * consensus + (1 - weight) * scaled


def consensus_rerank(asif_scores: Tensor, candidate_emb: Tensor, *, weight: float = 1.0) -> Tensor:
    """``(B,)`` index of the chosen candidate per row: the argmax of :func:`consensus_scores`."""
    return consensus_scores(asif_scores, candidate_emb, weight=weight).argmax(dim=1)
