"""How much of a captioning score is the choice of photos: bootstrap intervals over the images.

An evaluation set of a few dozen photos gives CIDEr figures that move by several points when
other photos of the same kind are drawn. Two intervals make that visible:

- :func:`mean_interval`: the percentile bootstrap interval of a method's corpus score, from its
  per-image scores (Efron & Tibshirani (1993), "An Introduction to the Bootstrap");
- :func:`clustered_interval`: the same for a share of hits (or a ratio of sums) among queries
  that come in groups (text→image retrieval, or an adapter's loss per caption token: the
  captions of one photo are drawn together);
- :func:`paired_difference`: the paired bootstrap of the difference between two methods on the
  same images (Koehn (2004), "Statistical Significance Tests for Machine Translation
  Evaluation"): each resample draws photos with replacement and scores both methods on the same
  draw, so what the photos have in common cancels out.

Both resample per-image CIDEr-D as pycocoevalcap computes it, whose mean is the corpus CIDEr;
its document frequencies stay those of the whole evaluation set (the usual approximation: a
resample does not recompute them). The intervals cover the choice of photos only, not a trained
adapter's seed or training data. Resampling is :func:`scipy.stats.bootstrap` with a fixed seed, so
a report is reproducible.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["RESAMPLES", "LEVEL", "mean_interval", "clustered_interval", "paired_difference", "compare_to",
           "compare_report"]

#: bootstrap resamples: enough that the interval ends agree to a few tenths of a CIDEr point
#: between seeds
RESAMPLES = 10_000
#: two-sided confidence level of every interval
LEVEL = 0.95


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Any, seed: int) -> Any:
    from scipy.stats import bootstrap

    return bootstrap(data, statistic, n_resamples=RESAMPLES, confidence_level=LEVEL, method="percentile",
                     vectorized=True, paired=len(data) > 1, rng=np.random.default_rng(seed))


def _ends(result: Any) -> list[float]:
    """``[low, high]`` of a :func:`scipy.stats.bootstrap` result."""
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def _checked(scores: Sequence[float], name: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"{name}: need per-image scores of at least 2 images, got shape {values.shape}")
    return values


def mean_interval(scores: Sequence[float], *, seed: int = 0) -> list[float]:
    """``[low, high]``: the :data:`LEVEL` percentile bootstrap interval of ``mean(scores)``."""
    return _ends(_bootstrap((_checked(scores, "scores"),), np.mean, seed))


def clustered_interval(hits: Sequence[float], groups: Sequence[int], *, weights: Sequence[float] | None = None,
                       seed: int = 0) -> list[float]:
    """``[low, high]``: the :data:`LEVEL` interval of ``sum(hits) / sum(weights)`` (``weights``
    default to 1 per query: the share of hits) when the queries come in ``groups`` that are drawn
    together (e.g. the captions of one photo, which share its difficulty): a cluster bootstrap,
    each draw taking whole groups and scoring their ratio of sums."""
    hits = np.asarray(hits, dtype=np.float64)
    groups = np.asarray(groups)
    weights = np.ones_like(hits) if weights is None else np.asarray(weights, dtype=np.float64)
    if hits.shape != groups.shape or hits.shape != weights.shape or hits.ndim != 1:
        raise ValueError(f"one group and weight per hit: {hits.shape} hits, {groups.shape} groups, "
                         f"{weights.shape} weights")
    _, inverse = np.unique(groups, return_inverse=True)
    totals = _checked(np.bincount(inverse, weights=hits), "groups")
    counts = np.bincount(inverse, weights=weights)
    return _ends(_bootstrap((totals, counts), lambda t, c, axis: t.sum(axis) / c.sum(axis), seed))


def paired_difference(scores: Sequence[float], baseline: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of ``mean(scores) - mean(baseline)`` over the same images.

    Returns ``{"delta": float, "interval": [low, high], "ahead": share of resamples in which
    ``scores`` has the higher mean, "n": number of images}``.
    """
    a, b = _checked(scores, "scores"), _checked(baseline, "baseline")
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same images: {len(a)} scores against {len(b)} for the baseline")
    result = _bootstrap((a - b,), np.mean, seed)
    return {"delta": float((a - b).mean()), "interval": _ends(result),
            "ahead": float((result.bootstrap_distribution > 0).mean()), "n": len(a)}


def compare_to(per_image: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict[str, Any]]:
    """:func:`paired_difference` of every method in ``per_image`` (name -> per-image scores on the
    same images, in the same order) against ``baseline``, which must be one of them."""
    if baseline not in per_image:
        raise KeyError(f"no per-image scores for the baseline {baseline!r}")
    return {name: paired_difference(scores, per_image[baseline])
            for name, scores in per_image.items() if name != baseline}


def compare_report(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """The CIDEr comparison of an evaluation report (the content of ``results.json``):
    ``{"baseline": name, "metric": "CIDEr", "methods": {name: paired_difference(...)}}`` for every
    captioning method that finished with per-image scores, or ``None`` when the report has no
    baseline, the baseline did not finish, or nothing else did."""
    baseline = results.get("baseline")
    per_image = {name: entry["per_image"]["CIDEr"] for name, entry in results.get("methods", {}).items()
                 if entry.get("status") == "ok" and len(entry.get("per_image", {}).get("CIDEr", ())) > 1}
    if baseline not in per_image or len(per_image) < 2:
        return None
    return {"baseline": baseline, "metric": "CIDEr", "methods": compare_to(per_image, baseline)}
