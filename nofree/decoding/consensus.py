"""Choose among candidate captions by their consensus with pseudo-references (CIDEr-D MBR).

A frozen LM prompted with different in-context examples writes several plausible captions; the
one to keep is the candidate that agrees most, under CIDEr-D (Vedantam, Zitnick, Parikh (2015),
"CIDEr: Consensus-based Image Description Evaluation"), with the captions that retrieval finds
for the image. This is minimum-Bayes-risk selection (Kumar & Byrne, 2004) with the retrieved
captions standing in for the unknown references, the idea of consensus re-ranking for retrieved
captions (Devlin et al. (2015), "Exploring Nearest Neighbor Approaches for Image Captioning")
applied to generated ones. No model is trained; the cost is one CIDEr-D per candidate.

:class:`CiderD` follows the published definition: n-grams of 1 to 4 lower-cased words, TF-IDF
vectors per n (document frequencies from a fixed text collection, e.g. the caption pool, so a
caption's score never depends on which other images share its batch), the candidate's counts
clipped to each reference's, a Gaussian length penalty (σ = 6), mean over n and references, × 10.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

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
        """Index of the candidate with the highest :meth:`scores` (the first one on ties)."""
        if not candidates:
            raise ValueError("no candidate captions to choose from")
        scores = self.scores(candidates, references)
        return max(range(len(scores)), key=lambda i: (scores[i], -i))
