"""Zero-shot classification metrics: top-1 / top-k accuracy and a multi-label hit rate.

Zero-shot classification scores every image against one text prompt per class and predicts the
best-scoring class (Radford et al., 2021, "Learning Transferable Visual Models From Natural
Language Supervision"; with ASIF scores, Norelli et al., 2022). On images with several true
classes (COCO categories) the *hit rate* counts a prediction as correct when it is any of them.

Ties are broken against the image, as in ``nofree.eval.retrieval``: a constant scorer scores 0.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from torch import Tensor

from nofree.core import DataError
from nofree.eval.retrieval import first_relevant_rank


def topk_accuracy(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int],
                  k: int = 1) -> float:
    """Fraction of rows whose true class is among their ``k`` best-scored classes.

    ``scores``: ``(N, C)`` class scores (higher = better); ``labels``: ``(N,)`` class indices.
    """
    if int(k) < 1:
        raise DataError(f"k={k}: expected a positive integer")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be (N,) integer class indices, got shape {labels.shape} "
                        f"dtype {labels.dtype}")
    ranks = first_relevant_rank(scores, labels)
    if len(ranks) == 0:
        raise DataError("no images to score")
    return float((ranks < int(k)).float().mean())


def top1_accuracy(scores: Tensor | np.ndarray, labels: Tensor | np.ndarray | Sequence[int]) -> float:
    """Fraction of rows whose best-scored class is the true class; ``scores`` ``(N, C)``."""
    return topk_accuracy(scores, labels, k=1)


def hit_rate(scores: Tensor | np.ndarray, label_sets: Sequence[Iterable[int]] | Tensor | np.ndarray,
             k: int = 1) -> float:
    """Multi-label accuracy: fraction of rows with one of their true classes in their top ``k``.

    ``scores``: ``(N, C)``; ``label_sets``: per row, the indices of all its true classes (or an
    ``(N, C)`` bool matrix). Rows without any true class are an error: drop them first.
    """
    if int(k) < 1:
        raise DataError(f"k={k}: expected a positive integer")
    ranks = first_relevant_rank(scores, label_sets)
    if len(ranks) == 0:
        raise DataError("no images to score")
    return float((ranks < int(k)).float().mean())
