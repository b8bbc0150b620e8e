"""Consensus among candidate captions: keep the one that agrees most with the others.

Two measures of agreement, both from consensus re-ranking of retrieved captions (Devlin et al.
(2015), "Exploring Nearest Neighbor Approaches for Image Captioning": choose the caption most
similar to its neighbours):

- :class:`~nofree.eval.cider_d.CiderD`, for minimum-Bayes-risk selection (Kumar & Byrne, 2004).
  A frozen LM prompted with different in-context examples writes several plausible captions; the
  one to keep is the candidate that agrees most, under CIDEr-D, with the captions that retrieval
  finds for the image, which stand in for the unknown references; or, with no retrieval at hand,
  with the other candidates (a trained captioner's n best: :meth:`CiderD.agreement`). No model
  is trained; the cost is one CIDEr-D per candidate and reference.
- :func:`consensus_scores`: the mean cosine of each candidate's text embedding to the other
  candidates', mixed with its image-text score.
"""
from __future__ import annotations

import torch
from torch import Tensor

from nofree.eval.cider_d import CiderD, ngram_counts, words

__all__ = ["CiderD", "consensus_rerank", "consensus_scores", "ngram_counts", "words"]


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
