"""K-fold cross-validation of a captioning adapter's training recipe on coco-mini ``train``.

    python -m benchmarks.recipe_cv [--kind clipcap] [--folds 5] [--epochs 3] [--lr 1e-3]
                                   [--mapper mlp] [--prefix-length 10] [--augment hflip]
                                   [--decodings b1n3 b3n3] [--json PATH] [--smoke]

How the trained captioners' defaults are chosen without looking at ``val``: the 140 ``train``
photos are shuffled once (seed 0) and cut into ``--folds`` folds of whole photos (the contiguous
folds of :func:`benchmarks.folds.photo_folds`); for each fold an adapter is trained with
``nofree.adapters.train.train_adapter`` on the other folds' captions and
writes one caption per held-out photo with each ``--decodings`` entry (``bBnN``: B beams, no word
N-gram twice), scored against the photos' 5 captions with the CIDEr of ``nofree eval``. The
epochs are exact (the recipes' ``min_steps`` raise is not applied), so every fold trains
``epochs × ceil(captions / batch)`` steps. Frozen
features (and the mirrored views) come from nofree's embedding cache, so the photos are encoded
once for every fold and every run. The captions of each fold are kept in the JSON, to read.

``--smoke`` runs the same path on tiny config-built backbones, 20 photos, 2 folds and 1 epoch.
"""
from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import write_json
from benchmarks.folds import photo_folds
from benchmarks.fusion import frozen_setup
from nofree import sample_dir
from nofree.adapters.recipes import RECIPES

DECODING = re.compile(r"^b(\d+)n(\d+)$")


def photo_subset(examples, rows: list[int]):
    """The :class:`~nofree.adapters.train.Examples` of image rows ``rows`` only (renumbered)."""
    from nofree.adapters.train import Examples

    new_row = {old: new for new, old in enumerate(rows)}
    keep = [i for i, row in enumerate(examples.image_index.tolist()) if row in new_row]
    views = examples.view_features[:, rows] if examples.view_features is not None else None
    return Examples(image_features=examples.image_features[rows],
                    image_index=torch.tensor([new_row[int(examples.image_index[i])] for i in keep]),
                    texts=[examples.texts[i] for i in keep], view_features=views,
                    image_paths=[examples.image_paths[r] for r in rows])


def _parse_decoding(text: str) -> dict[str, int]:
    match = DECODING.match(text)
    if not match:
        raise SystemExit(f"--decodings: {text!r} is not bBnN (B beams, no word N-gram twice), e.g. b1n3")
    return {"beams": int(match[1]), "no_repeat_ngram": int(match[2])}


def main(argv=None) -> dict:
    from nofree.adapters.base import _load_backbone, adapter_class
    from nofree.adapters.train import prepare_examples, train_adapter
    from nofree.cache import EmbeddingCache
    from nofree.core import clean_caption
    from nofree.data.pairs import load_pairs
    from nofree.eval.captioning import caption_metrics
    from nofree.eval.degeneration import degeneration

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("clipcap", "flamingo"), default="clipcap")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--augment", choices=("none", "hflip"), default=None, help="default: the recipe's")
    parser.add_argument("--mapper", choices=("mlp", "transformer"), default="mlp", help="ClipCap only")
    parser.add_argument("--prefix-length", type=int, default=10, help="ClipCap only")
    parser.add_argument("--decodings", nargs="+", default=["b1n3", "b3n3"])
    parser.add_argument("--seed", type=int, default=0, help="training seed (the folds use seed 0)")
    parser.add_argument("--json")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/recipe_cv"))
    args = parser.parse_args(argv)
    decodings = {name: _parse_decoding(name) for name in args.decodings}
    recipe = RECIPES[args.kind]
    settings = {"kind": args.kind, "folds": args.folds, "epochs": args.epochs or recipe["epochs"],
                "lr": args.lr or recipe["lr"], "batch_size": args.batch_size or recipe["batch_size"],
                "augment": args.augment or recipe["augment"], "seed": args.seed}
    hparams = ({"mapper": args.mapper, "prefix_length": args.prefix_length} if args.kind == "clipcap" else {})
    settings["hparams"] = hparams
    args.work.mkdir(parents=True, exist_ok=True)
    backbones, _, epochs = frozen_setup(args.work, args.smoke)
    if args.smoke:
        settings["epochs"], settings["folds"] = epochs["epochs"], 2
    pairs = load_pairs(sample_dir() / "pairs.jsonl", split="train", limit=20 if args.smoke else None)
    image_encoder = _load_backbone("image_encoder", backbones["image"], None)
    lm = _load_backbone("lm", backbones["lm"], None)
    build = adapter_class(args.kind)

    def fresh():
        torch.manual_seed(args.seed)
        return build(image_encoder=image_encoder, lm=lm, **hparams)

    cache = EmbeddingCache()
    every = prepare_examples(fresh(), pairs, cache=cache, progress=False, augment=settings["augment"])
    references: dict[int, list[str]] = {}
    for text, row in zip(every.texts, every.image_index.tolist()):
        references.setdefault(row, []).append(text)
    folds = photo_folds(len(every.image_features), settings["folds"], deal="contiguous")
    cells = []
    for fold, (held, fit) in enumerate(folds):
        held, fit = held.tolist(), fit.tolist()
        adapter = fresh()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            result = train_adapter(adapter, photo_subset(every, fit), epochs=settings["epochs"],
                                   batch_size=settings["batch_size"], lr=settings["lr"], seed=args.seed,
                                   out_dir=Path(scratch) / "adapter", progress=False,
                                   precision="bf16", augment=settings["augment"])
        cell = {"fold": fold, "held_photos": len(held), "steps": result.steps,
                "train_s": round(time.perf_counter() - start, 1),
                "train_loss": result.history[-1]["train_loss"], "decodings": {}}
        for name, options in decodings.items():
            with torch.no_grad():
                captions = [clean_caption(c) for c in
                            adapter.caption_features(every.image_features[held], max_tokens=30, **options)]
            metrics = caption_metrics(captions, [references[row] for row in held], meteor=False)
            cell["decodings"][name] = {"cider": metrics["CIDEr"], "bleu4": metrics["BLEU-4"],
                                       **degeneration(captions), "captions": captions}
            print(f"fold {fold} {name}: CIDEr {100 * metrics['CIDEr']:.1f} "
                  f"({cell['train_s']:.0f} s training)", flush=True)
        cells.append(cell)
    summary = {}
    for name in decodings:
        values = [100 * cell["decodings"][name]["cider"] for cell in cells]
        summary[name] = {"cider_mean": statistics.fmean(values),
                         "cider_sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "cider_folds": values,
                         "distinct": statistics.fmean(c["decodings"][name]["distinct"] for c in cells)}
    out = {"settings": settings, "backbones": backbones, "n_photos": len(every.image_features),
           "summary": summary, "cells": cells, "threads": torch.get_num_threads()}
    if args.json:
        write_json(args.json, out, indent=1)
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    s = out["settings"]
    lines = [f"{s['folds']}-fold cross-validation on the {out['n_photos']} `train` photos: {s['kind']} "
             f"{s['hparams']}, {s['epochs']} epochs, lr {s['lr']:g}, batch {s['batch_size']}, "
             f"augment {s['augment']}. Held-out CIDEr ×100, mean ± sd over folds.", "",
             "| decoding | CIDEr | per fold | distinct % |", "| --- | --- | --- | --- |"]
    for name, row in out["summary"].items():
        folds = " / ".join(f"{v:.1f}" for v in row["cider_folds"])
        lines.append(f"| {name} | {row['cider_mean']:.1f} ± {row['cider_sd']:.1f} | {folds} | "
                     f"{100 * row['distinct']:.0f} |")
    return "\n".join(lines)


NOTES = """The search itself (every configuration tried, with its numbers) is in the section
"Frozen vs trained fusion on coco-mini val", under "Trained fusion: how the recipes were chosen";
this section shows the last full run of this module."""


if __name__ == "__main__":
    main()
