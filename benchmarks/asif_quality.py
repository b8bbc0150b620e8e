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

from benchmarks import write_json
from benchmarks.folds import held_out_captions, photo_folds
from nofree import sample_dir
from nofree.anchors.anchor_set import AnchorSet
from nofree.captioning import default_pool_path
from nofree.anchors.asif import ASIF_DEFAULTS
from nofree.cache import EmbeddingCache
from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from nofree.data.pairs import load_pairs, load_text_lines


#: nofree's defaults without CSLS (the plain estimator's knobs), and its CSLS neighbours
PLAIN_DEFAULTS = {key: ASIF_DEFAULTS[key] for key in ("k", "p", "center")}
CSLS = ASIF_DEFAULTS["csls"]


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


# --- similarity variants: each maps an anchor set to sim(image_emb, text_emb) -> (n_images, n_texts)
def asif_variant(**params):
    """ASIF(**params): Norelli et al. (2022), with nofree's optional centring / per-modality k
    (no CSLS unless ``params`` ask for it)."""
    from nofree.anchors.asif import ASIF

    def fit(anchors: AnchorSet):
        asif = ASIF(**{"csls": 0, **params}).fit(anchors)
        return lambda image_emb, text_emb: torch.as_tensor(asif.similarity(image_emb, text_emb))
    return fit


def csls_variant(neighbours: int = 10, **params):
    """ASIF similarity with CSLS hubness correction (Lample et al., 2018): 2·s(x, y) − r(x) − r(y),
    r = mean of a query's ``neighbours`` highest similarities to the other modality's anchors."""
    from nofree.anchors.asif import ASIF

    def fit(anchors: AnchorSet):
        asif = ASIF(**params, csls=0).fit(anchors)  # the plain similarity; CSLS written out below

        def sim(image_emb, text_emb):
            s = torch.as_tensor(asif.similarity(image_emb, text_emb))
            r_image = torch.as_tensor(asif.similarity(image_emb, anchors.text)).topk(neighbours, 1).values.mean(1)
            r_text = torch.as_tensor(asif.similarity(anchors.image, text_emb)).topk(neighbours, 0).values.mean(0)
            return 2 * s - r_image[:, None] - r_text[None, :]
        return sim
    return fit


def decap_variant(temperature: float = 30.0, center: bool = True):
    """DeCap-style projection through the anchors (cf. Li et al., 2023): an image becomes the
    softmax(τ·cos(x, anchor images))-weighted mean of the anchor *texts*, compared by cosine with
    text embeddings (anchor means subtracted first when ``center``)."""
    from nofree.core import l2_normalize

    def fit(anchors: AnchorSet):
        mi = anchors.image.mean(0) if center else torch.zeros(anchors.image.shape[1])
        mt = anchors.text.mean(0) if center else torch.zeros(anchors.text.shape[1])
        a_img, a_txt = l2_normalize(anchors.image - mi), l2_normalize(anchors.text - mt)

        def sim(image_emb, text_emb):
            weights = torch.softmax(temperature * l2_normalize(image_emb - mi) @ a_img.T, dim=1)
            return l2_normalize(weights @ a_txt) @ l2_normalize(text_emb - mt).T
        return sim
    return fit


def fold_recalls(split: Split, variant, *, anchors=anchors_of, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Mean text→image and image→text R@1 over ``folds`` splits of the photos: anchors from the
    kept photos (``anchors(split, rows)``), ``variant(anchors)`` the
    similarity function, queries the held-out photos and their captions (the round-robin folds of
    :func:`benchmarks.folds.photo_folds`)."""
    from nofree.eval import retrieval_report

    scores: dict[str, list[float]] = {"t2i R@1": [], "i2t R@1": []}
    for held, kept in photo_folds(len(split.pairs), folds, seed):
        sim_fn = variant(anchors(split, kept))
        mask, owner = held_out_captions(split.owner, held, len(split.pairs))
        report = retrieval_report(torch.as_tensor(sim_fn(split.image_emb[held], split.text_emb[mask])), owner)
        for way in ("t2i", "i2t"):
            scores[f"{way} R@1"].append(report[way]["R@1"])
    return {key: sum(v) / len(v) for key, v in scores.items()}


def cross_validate(train: Split, variant, folds: int = 5, seed: int = 0) -> float:
    """Mean text→image R@1 over ``folds`` splits of the train photos (:func:`fold_recalls`)."""
    return fold_recalls(train, variant, folds=folds, seed=seed)["t2i R@1"]


def evaluate(variant, caption_params: dict, train: Split, val: Split, pool, pool_emb,
             label_emb, label_sets, meteor: bool) -> dict:
    from nofree.captioning import consensus_rerank
    from nofree.eval import caption_metrics, hit_rate, retrieval_report

    sim_fn = variant(anchors_of(train))
    report = retrieval_report(sim_fn(val.image_emb, val.text_emb), val.owner)
    pool_sim = sim_fn(val.image_emb, pool_emb)
    m = caption_params.get("rerank", 0)
    if m > 1:
        top_scores, top = pool_sim.topk(m, dim=1)
        chosen = top.gather(1, consensus_rerank(top_scores, pool_emb[top])[:, None]).squeeze(1)
    else:
        chosen = pool_sim.argmax(dim=1)
    captions = [pool[j] for j in chosen.tolist()]
    metrics = caption_metrics(captions, [list(p.captions) for p in val.pairs], meteor=meteor)
    has = [i for i, s in enumerate(label_sets) if s]
    zs = sim_fn(val.image_emb[has], label_emb)
    return {"t2i": report["t2i"], "i2t": report["i2t"],
            "caption": {k: metrics[k] for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")},
            "zero_shot_hit@1": hit_rate(zs, [label_sets[i] for i in has]), "zero_shot_n": len(has),
            "examples": captions[:3]}


def _name(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (starts a JVM)")
    parser.add_argument("--smoke", action="store_true", help="small grid, 2,000-caption pool, no METEOR")
    args = parser.parse_args(argv)
    from nofree.registry import load_encoder

    start = time.perf_counter()
    cache = EmbeddingCache()
    image_encoder = load_encoder(DEFAULT_IMAGE_ENCODER, modality="image")
    text_encoder = load_encoder(DEFAULT_TEXT_ENCODER, modality="text")
    train = encode_split("train", image_encoder, text_encoder, cache)
    val = encode_split("val", image_encoder, text_encoder, cache)
    pool = load_text_lines(default_pool_path())[: 2000 if args.smoke else None]
    pool_emb = cache.encode(text_encoder, pool, batch_size=128, progress=True)
    labels = json.loads((sample_dir() / "coco_categories.json").read_text())
    label_emb = cache.encode(text_encoder, [f"a photo of a {label}." for label in labels])
    label_sets = [[labels.index(c) for c in p.meta.get("categories", [])] for p in val.pairs]
    meteor = not (args.no_meteor or args.smoke)

    # 1. choose (k, p, center) by cross-validation on train only
    ks, ps = ([100, None], [2.0, 8.0]) if args.smoke else ([25, 50, 100, 200, 400, None], [1.0, 2.0, 4.0, 8.0])
    grid = [dict(k=k, p=p, center=c) for k, p, c in itertools.product(ks, ps, [False, True])]
    cv = sorted(((cross_validate(train, asif_variant(**params)), params) for params in grid),
                key=lambda item: -item[0])
    best = cv[0][1]
    paper = dict(k=None, p=8.0, center=False)
    print(f"cross-validated on train: best {best} (t2i R@1 {cv[0][0]:.3f}); "
          f"paper defaults: {next(s for s, q in cv if q == paper):.3f}")

    # 2. beyond the paper, also chosen on train only: per-modality k, CSLS, DeCap-style projection
    defaults = dict(PLAIN_DEFAULTS)
    extra = {f"per-modality k ({_name(kk)})": asif_variant(**defaults, **kk) for kk in
             ([dict(k_image=100, k_text=None)] if args.smoke else
              [dict(k_image=100, k_text=None), dict(k_image=None, k_text=100),
               dict(k_image=200, k_text=400), dict(k_image=400, k_text=200)])}
    extra.update({f"CSLS (K={n})": csls_variant(n, **defaults) for n in ([10] if args.smoke else [5, 10, 25])})
    extra.update({f"DeCap-style projection (tau={t})": decap_variant(t) for t in
                  ([30.0] if args.smoke else [10.0, 30.0, 100.0])})
    extra_cv = {name: cross_validate(train, variant) for name, variant in extra.items()}
    for name, score in extra_cv.items():
        print(f"cross-validated on train: {name}: t2i R@1 {score:.3f}")
    best_extra = {family: max((n for n in extra if n.startswith(family)), key=extra_cv.get)
                  for family in ("per-modality k", "CSLS", "DeCap")}

    # 3. evaluate the ablation on val
    rows = {
        "paper defaults (k=min(800,N), p=8)": (asif_variant(**paper), {}),
        "+ centering": (asif_variant(k=None, p=8.0, center=True), {}),
        f"+ CV-tuned {_name(best)}": (asif_variant(**best), {}),
        "+ consensus re-ranking (m=100)": (asif_variant(**best), {"rerank": 100}),
        "nofree defaults without CSLS (center, p=2, k=min(800,N), consensus m=100)": (
            asif_variant(**defaults), {"rerank": 100}),
        "paper defaults + consensus re-ranking": (asif_variant(**paper), {"rerank": 100}),
    }
    rows.update({f"nofree defaults without CSLS, {best_extra[f]} (best by CV), consensus":
                 (extra[best_extra[f]], {"rerank": 100}) for f in best_extra if f != "CSLS"})
    rows[f"nofree defaults (center, p=2, k=min(800,N), CSLS K={CSLS}, consensus m=100)"] = (
        csls_variant(CSLS, **defaults), {"rerank": 100})
    results = {}
    for name, (variant, caption_params) in rows.items():
        results[name] = r = evaluate(variant, caption_params, train, val, pool, pool_emb, label_emb,
                                     label_sets, meteor=meteor)
        print(f"{name:55s} t2i R@1 {r['t2i']['R@1']:.3f}  i2t R@1 {r['i2t']['R@1']:.3f}  "
              f"CIDEr {100 * r['caption']['CIDEr']:.1f}  zs {r['zero_shot_hit@1']:.3f}")
    out = {"cv": [{"params": p, "t2i_R@1": s} for s, p in cv], "best": best, "extra_cv": extra_cv,
           "rows": results, "n_anchors": len(train.owner), "n_val_images": len(val.pairs),
           "n_val_texts": len(val.owner), "pool": len(pool), "seconds": time.perf_counter() - start}
    print(markdown(out))
    if args.json:
        write_json(args.json, out)
    return out


def markdown(out: dict) -> str:
    fmt = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    cv = {json.dumps(row["params"], sort_keys=True): row["t2i_R@1"] for row in out["cv"]}
    paper = cv.get(json.dumps(dict(k=None, p=8.0, center=False), sort_keys=True))
    ours = cv.get(json.dumps(PLAIN_DEFAULTS, sort_keys=True))
    lines = [
        "EfficientNet-Lite0 (ImageNet classifier, 1280-d) and all-MiniLM-L6-v2 (384-d), never trained "
        f"together, composed by {out['n_anchors']} anchors. Retrieval among the {out['n_val_images']} val "
        f"photos / {out['n_val_texts']} val captions (t2i: each caption finds its photo; i2t: each photo "
        f"finds one of its captions). Caption retrieval picks one caption per photo from {out['pool']:,} "
        "pool captions (none of a sample photo). Zero-shot: the 80 COCO category names as prompts "
        "(\"a photo of a {}.\"), hit@1 = the top class is one of the photo's annotated categories "
        f"(n = {next(iter(out['rows'].values()))['zero_shot_n']} val photos with annotations).", "",
        f"Every choice was made by 5-fold cross-validation on `train` only (anchors from 4/5 of the train "
        f"photos, queries from the rest, mean t2i R@1) over {len(out['cv'])} (k, p, centring) settings: best "
        f"{out['best']} (CV R@1 {out['cv'][0]['t2i_R@1']:.3f}; the paper's defaults "
        + ("–" if paper is None else f"{paper:.3f}") + "; nofree's shipped default, centred with p = 2, "
        + ("–" if ours is None else f"{ours:.3f}") + "). Options beyond the paper, same protocol:", "",
        "| option (on nofree's defaults) | CV t2i R@1 |", "| --- | --- |",
        *(f"| {name} | {score:.3f} |" for name, score in out.get("extra_cv", {}).items()), "",
        "Evaluated once on `val`:", "",
        "| variant | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | BLEU-4 | METEOR | ROUGE-L | CIDEr | zero-shot hit@1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in out["rows"].items():
        c = r["caption"]
        lines.append(f"| {name} | {r['t2i']['R@1']:.3f} | {r['t2i']['R@5']:.3f} | {r['t2i']['R@10']:.3f} | "
                     f"{r['i2t']['R@1']:.3f} | {r['i2t']['R@5']:.3f} | {r['i2t']['R@10']:.3f} | "
                     f"{fmt(c['BLEU-4'])} | {fmt(c['METEOR'])} | {fmt(c['ROUGE-L'])} | {fmt(c['CIDEr'])} | "
                     f"{r['zero_shot_hit@1']:.3f} |")
    return "\n".join(lines)


NOTES = """Measured with plain ASIF similarity (the label bridge, nofree's default on top of it, is the
section "ASIF + the image encoder's labels").

What the ablation says:
- **Centring** each modality on its anchor mean (subtract, re-normalise) helps only together with a
  milder power: at p = 8 it hurts, while the best CV settings are centred with p = 1–2.
  EfficientNet features are non-negative and share a large common component, so raw cosines to
  every anchor are high and barely informative; centring removes it, and p = 8 then over-sharpens.
- **A milder power** (p = 1–2 instead of 8): with only 700 anchors, p = 8 concentrates each relative
  representation on a handful of anchors.
- **Consensus re-ranking** of the top-100 pool captions (pick the candidate closest, in the text
  encoder's space, to the other candidates; Devlin et al., 2015) is what lifts caption retrieval:
  ASIF's single best match is often an odd caption, the consensus of its neighbours a typical one.
- Zero-shot hit@1 is measured on about two dozen photos: one photo moves it by 0.04.
- **CSLS** (Lample et al., 2018: 2·s(x, y) − r(x) − r(y), r = a query's mean similarity to its K
  nearest anchors of the other modality) is the one option beyond the paper that cross-validation
  on `train` prefers to nofree's plain defaults; it also helps on `val` in every column, so
  `AsifPipeline` applies it by default (`csls=10`; `--csls 0` turns it off). It corrects hubness:
  captions and photos that are close to everything stop winning every query.
- Per-modality k and the DeCap-style projection do not beat the defaults in cross-validation and
  stay options of the benchmark only."""


if __name__ == "__main__":
    main()
