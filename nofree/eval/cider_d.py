"""CIDEr-D between captions, as a consensus measure: which candidate agrees most with references.

:class:`CiderD` follows the published definition (Vedantam, Zitnick, Parikh (2015), "CIDEr:
Consensus-based Image Description Evaluation"): n-grams of 1 to 4 lower-cased words, TF-IDF
vectors per n (document frequencies from a fixed text collection, e.g. a caption pool, so a
caption's score never depends on which other captions share its batch), the candidate's counts
clipped to each reference's, a Gaussian length penalty (σ = 6), mean over n and references, × 10.
Unlike the corpus-level CIDEr of :mod:`nofree.eval.captioning` it scores one candidate at a time,
for minimum-Bayes-risk selection (Kumar & Byrne, 2004): among candidate captions, keep the one
with the highest expected CIDEr-D against captions standing in for the unknown references
(:meth:`CiderD.choose`; their use in captioning: :mod:`nofree.captioning.consensus`).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Collection, Iterable, Sequence

__all__ = ["CiderD", "ngram_counts", "words"]

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

    def agreement(self, candidates: Sequence[str]) -> list[float]:
        """Each candidate's mean CIDEr-D against the *other* candidates (by position, so two
        candidates with the same words vote for each other): the expected gain of minimum-Bayes-risk
        selection when the candidates stand in for samples of the references (0 for one candidate)."""
        vectors = [self._vector(c) for c in candidates]
        out = []
        for i, vec in enumerate(vectors):
            sims = [self._similarity(vec, other) for j, other in enumerate(vectors) if j != i]
            out.append(10.0 * sum(sims) / len(sims) if sims else 0.0)
        return out

    def choose(self, candidates: Sequence[str], references: Sequence[str] | None = None, *,
               unfinished: Collection[int] = ()) -> int:
        """Index of the candidate with the highest :meth:`scores` against ``references`` (or, when
        ``references`` is None, the highest :meth:`agreement` with the other candidates), the first
        one on ties, among the sound ones, or among all when none is. A candidate is unsound when
        it loops or stutters (:func:`nofree.eval.degeneration.degenerate`) or its index is in
        ``unfinished`` (e.g. a draft cut at a length limit). CIDEr-D clips repeated n-grams but
        still rewards a run-on draft for the many reference words it lists ("A woman in a
        kitchen, a kitchen, a blender, a person, a"), and a cut draft for the words it got to, so
        a fault the reader sees is never preferred to a sound sentence."""
        from nofree.eval.degeneration import degenerate

        if not candidates:
            raise ValueError("no candidate captions to choose from")
        scores = self.agreement(candidates) if references is None else self.scores(candidates, references)
        sound = [i for i, text in enumerate(candidates) if i not in unfinished and not degenerate(text)]
        return max(sound or range(len(candidates)), key=lambda i: (scores[i], -i))
