"""ASIF quality on the bundled coco-mini sample, with the ablation table.

Anchors: the ``train`` split (140 photos × 5 captions = 700 anchors); evaluation: the ``val``
split (40 photos, 200 captions), which never enters anchors or the caption pool. Embedded
encoders only (EfficientNet-Lite0 + all-MiniLM-L6-v2). Reports:

- text→image and image→text R@1/5/10 among the 40 val photos;
- caption retrieval from the 24k-caption pool: BLEU-4, METEOR, ROUGE-L, CIDEr;
- zero-shot COCO category hit rate (top-1 is one of the photo's categories; 80 classes).

Hyperparameters are chosen by 5-fold cross-validation on ``train`` only (anchors from 4/5 of the
train photos, queries from the rest, mean t2i R@1), then evaluated once on ``val``: the ablation
rows show each change against the paper's defaults (k = min(800, N), p = 8, no centering).

    python -m benchmarks.asif_quality [--json PATH] [--no-meteor]
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import dataclass

import torch

from nofree import sample_dir
from nofree.anchors.anchor_set import AnchorSet
from nofree.anchors.pipeline import PIPELINE_ASIF_DEFAULTS
from nofree.cache import EmbeddingCache
from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from nofree.data.pairs import load_pairs, load_text_lines


@dataclass
class Split:
    image_emb: torch.Tensor        # (n_images, Di)
    text_emb: torch.Tensor         # (n_images * 5, Dt)
    owner: torch.Tensor            # (n_texts,) image index of each caption
    pairs: list


def encode_split(split: str, image_encoder, text_encoder, cache: EmbeddingCache) -> Split:
    pairs = load_pairs(sample_dir() / "pairs.jsonl", split=split)
    image_emb = cache.encode(image_encoder, [p.image for p in pairs])
    captions = [c for p in pairs for c in p.captions]
    owner = torch.arange(len(pairs)).repeat_interleave(torch.tensor([len(p.captions) for p in pairs]))
    return Split(image_emb, cache.encode(text_encoder, captions), owner, pairs)


def anchors_of(split: Split, rows: torch.Tensor | None = None) -> AnchorSet:
    """One anchor per (image, caption) of ``split`` (restricted to image indices ``rows``)."""
    keep = torch.ones(len(split.owner), dtype=torch.bool) if rows is None else torch.isin(split.owner, rows)
    captions = tuple(c for p in split.pairs for c in p.captions)
    return AnchorSet(split.image_emb[split.owner[keep]], split.text_emb[keep],
                     tuple(c for c, k in zip(captions, keep.tolist()) if k), DEFAULT_IMAGE_ENCODER,
                     DEFAULT_TEXT_ENCODER)


def t2i_r1(asif, image_emb, text_emb, owner) -> float:
    sim = torch.as_tensor(asif.similarity(image_emb, text_emb))
    return (sim.argmax(0) == owner).float().mean().item()


def cross_validate(train: Split, params: dict, folds: int = 5, seed: int = 0) -> float:
    """Mean text→image R@1 over ``folds`` splits of the train photos (anchors vs queries)."""
    from nofree.anchors.asif import ASIF

    order = torch.randperm(len(train.pairs), generator=torch.Generator().manual_seed(seed))
    scores = []
    for fold in range(folds):
        held = order[fold::folds]
        kept = order[torch.isin(order, held, invert=True)]
        asif = ASIF(**params).fit(anchors_of(train, kept))
        mask = torch.isin(train.owner, held)
        remap = torch.full((len(train.pairs),), -1, dtype=torch.long)
        remap[held] = torch.arange(len(held))
        scores.append(t2i_r1(asif, train.image_emb[held], train.text_emb[mask], remap[train.owner[mask]]))
    return sum(scores) / len(scores)


def evaluate(asif_params: dict, caption_params: dict, train: Split, val: Split, pool, pool_emb,
             labels_emb_fn, label_sets, meteor: bool) -> dict:
    from nofree.anchors.asif import ASIF
    from nofree.captioners import consensus_rerank
    from nofree.eval import caption_metrics, hit_rate, retrieval_report

    asif = ASIF(**asif_params).fit(anchors_of(train))
    sim = torch.as_tensor(asif.similarity(val.image_emb, val.text_emb))
    report = retrieval_report(sim, val.owner)
    pool_sim = torch.as_tensor(asif.similarity(val.image_emb, pool_emb))
    m = caption_params.get("rerank", 0)
    if m > 1:
        top_scores, top = pool_sim.topk(m, dim=1)
        chosen = top.gather(1, consensus_rerank(top_scores, pool_emb[top])[:, None]).squeeze(1)
    else:
        chosen = pool_sim.argmax(dim=1)
    captions = [pool[j] for j in chosen.tolist()]
    metrics = caption_metrics(captions, [list(p.captions) for p in val.pairs], meteor=meteor)
    has = [i for i, s in enumerate(label_sets) if s]
    zs = torch.as_tensor(asif.similarity(val.image_emb[has], labels_emb_fn()))
    return {"t2i": report["t2i"], "i2t": report["i2t"],
            "caption": {k: metrics[k] for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")},
            "zero_shot_hit@1": hit_rate(zs, [label_sets[i] for i in has]), "zero_shot_n": len(has),
            "examples": captions[:3]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (starts a JVM)")
    args = parser.parse_args(argv)
    from nofree.registry import load_encoder

    start = time.perf_counter()
    cache = EmbeddingCache()
    image_encoder = load_encoder(DEFAULT_IMAGE_ENCODER, modality="image")
    text_encoder = load_encoder(DEFAULT_TEXT_ENCODER, modality="text")
    train = encode_split("train", image_encoder, text_encoder, cache)
    val = encode_split("val", image_encoder, text_encoder, cache)
    pool = load_text_lines(sample_dir() / "caption_corpus.txt")
    pool_emb = cache.encode(text_encoder, pool, batch_size=128, progress=True)
    labels = json.loads((sample_dir() / "coco_categories.json").read_text())
    label_emb = cache.encode(text_encoder, [f"a photo of a {label}." for label in labels])
    label_sets = [[labels.index(c) for c in p.meta.get("categories", [])] for p in val.pairs]

    # 1. choose (k, p, center) by cross-validation on train only
    grid = [dict(k=k, p=p, center=c) for k, p, c in
            itertools.product([25, 50, 100, 200, 400, None], [1.0, 2.0, 4.0, 8.0], [False, True])]
    cv = [(cross_validate(train, params), params) for params in grid]
    cv.sort(key=lambda item: -item[0])
    best = cv[0][1]
    print(f"cross-validated on train: best {best} (t2i R@1 {cv[0][0]:.3f}); "
          f"paper defaults k=None p=8: {next(s for s, q in cv if q == dict(k=None, p=8.0, center=False)):.3f}")

    # 2. evaluate the ablation on val
    rows = {
        "paper defaults (k=min(800,N), p=8)": (dict(k=None, p=8.0), {}),
        "+ centering": (dict(k=None, p=8.0, center=True), {}),
        f"+ CV-tuned k={best['k']}, p={best['p']}, center={best['center']}": (best, {}),
        "+ consensus re-ranking (m=100)": (best, {"rerank": 100}),
        "nofree defaults (center, p=2, k=min(800,N), consensus m=100)": (
            dict(k=None, **PIPELINE_ASIF_DEFAULTS), {"rerank": 100}),
        "paper defaults + consensus re-ranking": (dict(k=None, p=8.0), {"rerank": 100}),
    }
    results = {}
    for name, (asif_params, caption_params) in rows.items():
        results[name] = evaluate(asif_params, caption_params, train, val, pool, pool_emb,
                                 lambda: label_emb, label_sets, meteor=not args.no_meteor)
        r = results[name]
        print(f"{name:55s} t2i R@1 {r['t2i']['R@1']:.3f}  i2t R@1 {r['i2t']['R@1']:.3f}  "
              f"CIDEr {100 * r['caption']['CIDEr']:.1f}  zs {r['zero_shot_hit@1']:.3f}")
    out = {"cv": [{"params": p, "t2i_R@1": s} for s, p in cv], "best": best, "rows": results,
           "n_anchors": len(train.owner), "n_val_images": len(val.pairs), "n_val_texts": len(val.owner),
           "pool": len(pool), "seconds": time.perf_counter() - start}
    print(markdown(out))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def markdown(out: dict) -> str:
    lines = ["| variant | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | BLEU-4 | METEOR | ROUGE-L | CIDEr | zero-shot hit@1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in out["rows"].items():
        c = r["caption"]
        fmt = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
        lines.append(f"| {name} | {r['t2i']['R@1']:.3f} | {r['t2i']['R@5']:.3f} | {r['t2i']['R@10']:.3f} | "
                     f"{r['i2t']['R@1']:.3f} | {r['i2t']['R@5']:.3f} | {r['i2t']['R@10']:.3f} | "
                     f"{fmt(c['BLEU-4'])} | {fmt(c['METEOR'])} | {fmt(c['ROUGE-L'])} | {fmt(c['CIDEr'])} | "
                     f"{r['zero_shot_hit@1']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
