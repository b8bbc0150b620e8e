"""Default training recipes of ``nofree train``, as data.

One place for each method's epochs, batch size, learning rate and augmentation: the ``train_*`` functions take
their defaults from here and the CLI's ``--help`` states them (this module imports nothing heavy).
How the captioning recipes were chosen is in benchmarks/RESULTS.md ("Trained fusion").
"""
from __future__ import annotations

RECIPES: dict[str, dict[str, int | float | str]] = {
    "lit": {"epochs": 10, "batch_size": 64, "lr": 1e-3, "augment": "none"},
    "clipcap": {"epochs": 3, "batch_size": 16, "lr": 1e-3, "augment": "hflip"},
    "flamingo": {"epochs": 3, "batch_size": 16, "lr": 5e-4, "augment": "hflip"},
    "smallcap": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "augment": "hflip"},
}


def describe(setting: str) -> str:
    """``"lit 10, clipcap 2, ..."``: each method's default ``setting``, for help texts."""
    return ", ".join(f"{kind} {recipe[setting]}" if isinstance(recipe[setting], str) else
                     f"{kind} {recipe[setting]:g}" for kind, recipe in RECIPES.items())
