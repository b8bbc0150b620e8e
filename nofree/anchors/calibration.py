"""Zero-shot probabilities from ASIF scores, with a softmax temperature chosen on the anchor set.

ASIF similarities (Norelli et al., 2022) rank class prompts but are not probabilities, and unlike
CLIP's cosines they come with no learned logit scale. ``nofree classify --probabilities`` reports
``softmax(scores / τ)`` over the labels (:func:`class_probabilities`), and :func:`choose_temperature`
picks τ by cross-validation on the anchor set itself, so no labelled data and nothing stored on
disk is needed:

1. The anchors are grouped by photo (their image paths, or identical image embeddings when the set
   records no paths); at most ``max_photos`` photos take part (a seeded random subset; all of them
   for sets up to that size).
2. The photos are split at random (seed 0) into ``folds`` folds (5; fewer for tiny sets, at least
   2 photos a fold). For each fold an ASIF with the given settings (the ones classify uses) is
   fitted on the anchors of the *other* folds' photos only: no held-out photo or caption is an
   anchor, so nothing is scored against itself (k is clipped to the smaller anchor set).
3. Inside a fold, each held-out photo is scored against one caption (its first) of every held-out
   photo, a zero-shot problem in which the fold's captions play the class prompts.
4. τ is the value of :data:`TEMPERATURE_GRID` (0.001 to 1, four values a decade) of lowest mean
   negative log-likelihood of each photo's own caption under ``softmax(scores / τ)``; ties go to
   the first (smallest). The choice is deterministic.

Measured on one CPU thread: 0.35 s for the 700-anchor coco-mini set (140 photos), 4 s for a
50,000-anchor set (its 500 sampled photos, 5 captions each), so classify computes τ on each run
and stores nothing. The choice is stable under subsampling: 60, 100 and all 140 coco-mini photos
give the same τ (0.178 with nofree's default ASIF settings).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nofree.core import DataError

#: The softmax temperatures tried: 10^(e/4) for e = -12..0, i.e. 0.001 ... 1.
TEMPERATURE_GRID = tuple(round(10 ** (e / 4), 6) for e in range(-12, 1))
#: Photos that take part in the cross-validation, at most (a seeded random subset beyond).
MAX_PHOTOS = 500
#: Folds of the cross-validation (fewer when the set has under 2 photos per fold).
FOLDS = 5


@dataclass(frozen=True)
class Temperature:
    """The chosen softmax temperature and how it was chosen.

    value:    τ, an entry of ``grid``
    grid:     the temperatures tried
    nll:      mean negative log-likelihood of each held-out photo's caption, per entry of ``grid``
    n_photos: photos that took part; folds: the number of folds
    """

    value: float
    grid: tuple[float, ...]
    nll: tuple[float, ...]
    n_photos: int
    folds: int


def check_temperature(temperature: float) -> None:
    """Raise ``DataError`` unless ``temperature`` is a positive finite number."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise DataError(f"a softmax temperature must be a positive finite number, got {temperature!r}")


def class_probabilities(scores: Tensor, temperature: float) -> Tensor:
    """``softmax(scores / τ)`` over the last dimension: ``(n, C)`` class scores -> ``(n, C)``
    float32 probabilities (each row sums to 1; the order of the scores is kept)."""
    check_temperature(temperature)
    return torch.softmax(scores.double() / temperature, dim=-1).float()


def _photos(anchors: Any) -> list[list[int]]:
    """Anchor rows grouped by photo, in first-seen order: by image path, else by identical rows."""
    images = getattr(anchors, "images", ())
    if images and len(images) == len(anchors.image):
        keys: list[Any] = list(images)
    else:
        keys = [row.numpy().tobytes() for row in torch.as_tensor(anchors.image).float().cpu()]
    groups: dict[Any, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def choose_temperature(anchors: Any, asif: Any, *, grid: tuple[float, ...] = TEMPERATURE_GRID,
                       folds: int = FOLDS, max_photos: int = MAX_PHOTOS, seed: int = 0) -> Temperature:
    """The softmax temperature for ``asif``'s zero-shot scores, chosen by cross-validation on
    ``anchors`` (an AnchorSet; see the module docstring for the protocol). ``asif``: the ASIF
    whose scores will be turned into probabilities (its settings are copied, fitted or not;
    ``search="index"`` is replaced by exact search)."""
    from nofree.anchors.asif import ASIF

    photos = _photos(anchors)
    if len(photos) < 4:
        raise DataError(f"choosing a softmax temperature needs an anchor set with at least 4 distinct "
                        f"photos (it cross-validates on them); this one has {len(photos)}")
    if not grid:
        raise DataError("the temperature grid is empty")
    for value in grid:
        check_temperature(value)
    rng = random.Random(seed)
    if len(photos) > max_photos:
        photos = [photos[i] for i in sorted(rng.sample(range(len(photos)), max_photos))]
    order = list(range(len(photos)))
    rng.shuffle(order)
    folds = max(2, min(folds, len(photos) // 2))
    params = {**asif.get_params(), "search": "exact"}
    image, text = torch.as_tensor(anchors.image), torch.as_tensor(anchors.text)
    scores: list[Tensor] = []
    for fold in range(folds):
        held = [photos[i] for i in order[fold::folds]]
        held_rows = {row for rows in held for row in rows}
        train = sorted(row for rows in photos for row in rows if row not in held_rows)
        fold_anchors = (image[train], text[train])
        if hasattr(asif, "refit"):  # a label bridge around the ASIF: the same bridge on the fold
            fitted = asif.refit(fold_anchors, **_clipped(params, len(train)))
        else:
            fitted = ASIF(**_clipped(params, len(train))).fit(fold_anchors)
        first = torch.tensor([rows[0] for rows in held])
        scores.append(torch.as_tensor(fitted.similarity(image[first], text[first])).double().cpu())
    nll = tuple(float(torch.cat([-torch.log_softmax(s / t, dim=1).diagonal() for s in scores]).mean())
                for t in grid)
    best = min(range(len(grid)), key=lambda i: (nll[i], i))
    return Temperature(float(grid[best]), tuple(float(t) for t in grid), nll, len(photos), folds)


def _clipped(params: dict, n: int) -> dict:
    """``params`` with every k at most ``n`` (the anchors of a training fold)."""
    return {key: (min(value, n) if key in ("k", "k_image", "k_text") and value is not None else value)
            for key, value in params.items()}
