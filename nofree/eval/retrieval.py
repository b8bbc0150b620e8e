"""Cross-modal retrieval metrics: Recall@K in both directions.

R@K is the fraction of queries for which at least one correct item is among the K
highest-scoring items, the measure used for COCO / Flickr30k image–text retrieval since
Karpathy & Fei-Fei (2015, "Deep Visual-Semantic Alignments for Generating Image
Descriptions"). On COCO each image has 5 captions: text→image has one correct image per
caption, image→text counts a hit when any of the image's captions is retrieved.

Ties are broken against the query: a correct item tied with a wrong one counts as ranked below
it, so a constant scorer gets no credit (argsort-based code breaks ties arbitrarily).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from nofree.core import DataError

_CHUNK = 1024  # queries per block, so the (queries, items) masks stay small


def _as_scores(scores: Tensor | np.ndarray, name: str) -> Tensor:
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float32)
    if scores.dim() != 2:
        raise DataError(f"{name} must be a 2-d (queries, items) matrix, got shape {tuple(scores.shape)}")
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        raise DataError(f"{name} contains NaN or infinite values; check the embeddings")
    return scores


def relevance_mask(relevant: Sequence[Iterable[int]] | Tensor | np.ndarray, n_queries: int,
                   n_items: int) -> Tensor:
    """``(n_queries, n_items)`` bool: ``relevant[q]`` is query q's set of correct item indices.

    ``relevant`` may also be a list of ints or a ``(n_queries,)`` integer array (one correct item
    per query), or already a ``(n_queries, n_items)`` bool array.
    """
    if isinstance(relevant, (Tensor, np.ndarray)):
        relevant = torch.as_tensor(relevant)
        if relevant.dtype == torch.bool and relevant.dim() == 2:
            if tuple(relevant.shape) != (n_queries, n_items):
                raise DataError(f"relevance mask has shape {tuple(relevant.shape)}, expected "
                                f"{(n_queries, n_items)}")
            mask = relevant.clone()
        elif relevant.dim() == 1 and not relevant.is_floating_point() and relevant.dtype != torch.bool:
            relevant = relevant.long()
            if len(relevant) != n_queries:
                raise DataError(f"{len(relevant)} labels for {n_queries} queries")
            if len(relevant) and (int(relevant.min()) < 0 or int(relevant.max()) >= n_items):
                raise DataError(f"correct item indices must lie in [0, {n_items}), got "
                                f"[{int(relevant.min())}, {int(relevant.max())}]")
            mask = torch.zeros(n_queries, n_items, dtype=torch.bool)
            mask[torch.arange(n_queries), relevant] = True
        else:
            raise DataError(f"relevant must be (queries,) integer indices or a (queries, items) bool "
                            f"mask, got dtype {relevant.dtype} shape {tuple(relevant.shape)}")
    else:
        relevant = list(relevant)
        if len(relevant) != n_queries:
            raise DataError(f"{len(relevant)} relevance sets for {n_queries} queries")
        mask = torch.zeros(n_queries, n_items, dtype=torch.bool)
        for query, items in enumerate(relevant):
            items = [int(items)] if isinstance(items, (int, np.integer)) else [int(i) for i in items]
            if any(i < 0 or i >= n_items for i in items):
                raise DataError(f"query {query}: correct item indices {items} outside [0, {n_items})")
            mask[query, items] = True
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if len(empty):
        raise DataError(f"{len(empty)} queries have no correct item (e.g. query {int(empty[0])}); "
                        "drop them before scoring")
    return mask


def first_relevant_rank(scores: Tensor | np.ndarray,
                        relevant: Sequence[Iterable[int]] | Tensor | np.ndarray) -> Tensor:
    """0-based rank of the best-scored correct item of each query: ``(n_queries,)`` long.

    ``scores`` is ``(n_queries, n_items)``, higher = better. The rank counts the wrong items
    scoring at least as high (ties go against the query). Rank < K means a hit at K.
    """
    scores = _as_scores(scores, "scores")
    mask = relevance_mask(relevant, *scores.shape)
    ranks = []
    for start in range(0, scores.shape[0], _CHUNK):
        block, good = scores[start:start + _CHUNK], mask[start:start + _CHUNK]
        best = block.masked_fill(~good, float("-inf")).max(dim=1).values
        ranks.append(((block >= best[:, None]) & ~good).sum(dim=1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_at_k(similarity: Tensor | np.ndarray,
                relevant: Sequence[Iterable[int]] | Tensor | np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"R@k": fraction of queries with a correct item in their top k}`` for each k in ``ks``.

    ``similarity``: ``(n_queries, n_items)``; ``relevant``: per query, the indices of its
    correct items (see ``relevance_mask`` for the accepted forms).
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise DataError(f"ks={tuple(ks)}: expected positive integers such as (1, 5, 10)")
    ranks = first_relevant_rank(similarity, relevant)
    if len(ranks) == 0:
        raise DataError("no queries to score")
    return {f"R@{int(k)}": float((ranks < int(k)).float().mean()) for k in ks}


def retrieval_report(sim_image_text: Tensor | np.ndarray, text_to_image: Tensor | np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """Both directions of image–text retrieval.

    ``sim_image_text``: ``(n_images, n_texts)``; ``text_to_image``: ``(n_texts,)`` long, the
    image each text describes. Returns ``{"t2i": {"R@1": ...}, "i2t": {...}}`` with ``"n"`` (the
    number of queries) in each.
    """
    sim = _as_scores(sim_image_text, "sim_image_text")
    owners = torch.as_tensor(text_to_image)
    if owners.dim() != 1 or owners.is_floating_point() or len(owners) != sim.shape[1]:
        raise DataError(f"text_to_image must be ({sim.shape[1]},) integer image indices, one per "
                        f"text column; got shape {tuple(owners.shape)} dtype {owners.dtype}")
    owners = owners.long()
    text_mask = relevance_mask(owners, sim.shape[1], sim.shape[0])  # (n_texts, n_images)
    t2i = recall_at_k(sim.T, text_mask, ks)
    image_mask = text_mask.T.contiguous()
    uncaptioned = (~image_mask.any(dim=1)).nonzero().flatten()
    if len(uncaptioned):
        raise DataError(f"{len(uncaptioned)} images have no text (e.g. image {int(uncaptioned[0])}); "
                        "every image row needs at least one caption column")
    i2t = recall_at_k(sim, image_mask, ks)
    return {"t2i": {**t2i, "n": sim.shape[1]}, "i2t": {**i2t, "n": sim.shape[0]}}


def r1_intervals(sim_image_text: Tensor | np.ndarray, text_to_image: Tensor | np.ndarray) -> dict[str, list[float]]:
    """Bootstrap intervals over the images of both R@1 of :func:`retrieval_report` (same inputs):
    ``{"t2i R@1 interval": [low, high], "i2t R@1 interval": [low, high]}``. Text→image draws each
    image's texts together (they share its difficulty: :func:`~nofree.eval.significance.clustered_interval`);
    image→text draws the images (:func:`~nofree.eval.significance.mean_interval`)."""
    from nofree.eval.significance import clustered_interval, mean_interval

    sim = _as_scores(sim_image_text, "sim_image_text")
    owners = torch.as_tensor(text_to_image).long()
    relevant = relevance_mask(owners, sim.shape[1], sim.shape[0])   # (n_texts, n_images)
    return {"t2i R@1 interval": clustered_interval((first_relevant_rank(sim.T, relevant) == 0).numpy(),
                                                   owners.numpy()),
            "i2t R@1 interval": mean_interval((first_relevant_rank(sim, relevant.T) == 0).numpy())}
