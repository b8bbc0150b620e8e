"""Cross-validation folds over the photos of a split: the one fold builder of the benchmarks.

Every benchmark that cross-validates on coco-mini ``train`` holds out whole photos (all 5 of a
photo's captions leave together) and takes its folds from :func:`photo_folds`, so the same
arguments always give the same held-out photos.
"""
from __future__ import annotations

import torch

#: How the shuffled photos are dealt to the folds (see :func:`photo_folds`).
DEALS = ("round-robin", "contiguous")


def photo_folds(n_photos: int, folds: int = 5, seed: int = 0, *, deal: str = "round-robin",
                dealt: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(held, kept)`` per fold: the photo indices (``long`` tensors, rows of ``range(n_photos)``)
    a fold holds out and the ones it keeps (anchors, training data).

    The photos are shuffled once (``torch.randperm`` seeded with ``seed``), then dealt:

    - ``"round-robin"``: the ``j``-th photo of the shuffle goes to fold ``j % folds``. The
      training-free benchmarks (``asif_quality``, ``embedded_encoders``, ``magic_quality`` and
      ``embedded_lms``) use these folds.
    - ``"contiguous"``: the shuffle is cut into ``folds`` runs of consecutive photos, at
      ``round(i * n / folds)``, so the sizes differ by at most one. The trained-adapter
      cross-validation (``recipe_cv``) uses these folds.

    The two rules give different folds from the same shuffle; both are kept so that every number
    a benchmark reports is reproduced with its own folds.

    ``held`` and ``kept`` both list photos in shuffle order, so ``kept`` is the concatenation of
    the other folds' photos under ``"contiguous"``. ``dealt``: deal only the first ``dealt``
    photos of the shuffle; the others are in ``kept`` for every fold (a smoke run that captions a
    few photos with anchors from all the others).
    """
    if deal not in DEALS:
        raise ValueError(f"deal must be one of {DEALS}, not {deal!r}")
    dealt = n_photos if dealt is None else dealt
    if not 0 < dealt <= n_photos:
        raise ValueError(f"dealt must be in 1..{n_photos}, not {dealt}")
    if not 0 < folds <= dealt:
        raise ValueError(f"folds must be in 1..{dealt} (the photos dealt), not {folds}")
    order = torch.randperm(n_photos, generator=torch.Generator().manual_seed(seed))
    if deal == "round-robin":
        held = [order[:dealt][fold::folds] for fold in range(folds)]
    else:
        cut = [round(i * dealt / folds) for i in range(folds + 1)]
        held = [order[cut[i]:cut[i + 1]] for i in range(folds)]
    return [(h, order[torch.isin(order, h, invert=True)]) for h in held]


def held_out_captions(owner: torch.Tensor, held: torch.Tensor, n_photos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The captions of the ``held`` photos and each one's photo among them: ``(mask, photo)``, a
    boolean mask over all captions (``owner``: each caption's photo index in ``range(n_photos)``)
    and, for the masked captions, the position of their photo in ``held`` (what
    ``retrieval_report`` takes)."""
    mask = torch.isin(owner, held)
    remap = torch.full((n_photos,), -1, dtype=torch.long)
    remap[held] = torch.arange(len(held))
    return mask, remap[owner[mask]]
