"""Default training recipes of ``nofree train``, as data.

One place for each method's epochs, batch size, learning rate, augmentation and minimum number of optimiser
steps: the ``train_*`` functions take their defaults from here and the CLI's ``--help`` states them (this
module imports nothing heavy).

``min_steps``: a recipe's epochs are raised, on a training set too small for them, until training runs at
least this many optimiser steps (the steps the recipe takes on coco-mini's 700 captions). Without it a
few dozen pairs would get a handful of steps, the learning rate would never leave its warm-up, and the
adapter would write text unrelated to the photo (RESULTS.md, "Captioning quality against training
pairs"). Giving ``epochs`` explicitly turns the raise off.
How the captioning recipes were chosen is in benchmarks/RESULTS.md ("Trained fusion").
"""
from __future__ import annotations

#: Feature-level augmentations a recipe may name (:mod:`nofree.adapters.augment`).
AUGMENTATIONS = ("none", "hflip", "crops")

RECIPES: dict[str, dict[str, int | float | str]] = {
    "lit": {"epochs": 10, "batch_size": 64, "lr": 1e-3, "augment": "none", "min_steps": 0},
    "clipcap": {"epochs": 6, "batch_size": 16, "lr": 1e-3, "augment": "hflip", "min_steps": 264},
    "flamingo": {"epochs": 6, "batch_size": 16, "lr": 5e-4, "augment": "hflip", "min_steps": 264},
    "smallcap": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "augment": "hflip", "min_steps": 88},
}


def describe(setting: str) -> str:
    """``"lit 10, clipcap 2, ..."``: each method's default ``setting`` (left out where it is 0),
    for help texts."""
    return ", ".join(f"{kind} {recipe[setting]}" if isinstance(recipe[setting], str) else
                     f"{kind} {recipe[setting]:g}" for kind, recipe in RECIPES.items() if recipe[setting] != 0)


def recipe_epochs(kind: str, epochs: int | None) -> tuple[int, int]:
    """``(epochs, min_steps)`` to train ``kind`` with: the recipe's, or ``epochs`` exactly as given."""
    if epochs is None:
        return int(RECIPES[kind]["epochs"]), int(RECIPES[kind]["min_steps"])
    return epochs, 0
