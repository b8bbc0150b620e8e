"""The label bridge: the image encoder's ImageNet head, read as words, added to ASIF (coco-mini).

:mod:`nofree.anchors.labels` gives every image a point in the text space through its own
classifier: the class-probability-weighted mean of the text embeddings of the 1,000 ImageNet class
names. This section chooses the bridge's two settings and measures what it changes:

1. **Cross-validation on ``train``** (5 round-robin folds of :func:`benchmarks.folds.photo_folds`
   over the 140 photos, anchors from the other four folds, 8 fold seeds): text→image and
   image→text R@1 over a grid of the softmax temperature t and the weight λ (λ = 0 is plain ASIF
   with nofree's defaults), and the label view alone (no anchors in the similarity at all).
2. **Caption retrieval** (the bundled pool, nofree's CIDEr consensus), CV CIDEr over 3 fold seeds
   for several λ at the chosen t: the use every captioner's examples and candidates rest on.
3. **``val`` once**, anchors from all of ``train``: R@1 with its bootstrap interval and caption
   retrieval CIDEr, plain ASIF against the bridge at its defaults, with the paired interval of the
   CIDEr difference; a few photos' top classes and captions, to read.

    python -m benchmarks.label_bridge [--json PATH] [--smoke]
"""
from __future__ import annotations

import argparse
import time


from benchmarks import write_json
from benchmarks.asif_quality import Split, anchors_of, encode_split
from benchmarks.folds import held_out_captions, photo_folds

TEMPERATURES = (0.125, 0.25, 0.5)
WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
CIDER_WEIGHTS = (0.0, 1.0, 2.0, 3.0)


def _pipeline(split: Split, rows, image_encoder, text_encoder, cache, **label):
    from nofree.anchors.pipeline import AsifPipeline

    return AsifPipeline.from_anchors(anchors_of(split, rows), image_encoder, text_encoder, cache=cache, **label)


def cross_validate(split: Split, encoders, cache, seeds: int, *, label_only: bool = False,
                   **label) -> dict[str, list[float]]:
    """Per fold seed, the mean over 5 folds of t2i and i2t R@1 (``label_only``: the label view's
    similarity alone)."""
    from nofree.eval import retrieval_report

    out: dict[str, list[float]] = {"t2i R@1": [], "i2t R@1": []}
    for seed in range(seeds):
        t2i, i2t = [], []
        for held, kept in photo_folds(len(split.pairs), 5, seed):
            pipeline = _pipeline(split, kept, *encoders, cache, **label)
            mask, owner = held_out_captions(split.owner, held, len(split.pairs))
            image, text = split.image_emb[held], split.text_emb[mask]
            sim = pipeline.asif.label_similarity(image, text) if label_only else pipeline.similarity(image, text)
            report = retrieval_report(sim, owner)
            t2i.append(report["t2i"]["R@1"])
            i2t.append(report["i2t"]["R@1"])
        out["t2i R@1"].append(sum(t2i) / len(t2i))
        out["i2t R@1"].append(sum(i2t) / len(i2t))
    return out


def retrieval_cider(split: Split, encoders, cache, pool, seeds: int, **label) -> list[float]:
    """CV CIDEr of caption retrieval, one value per fold seed."""
    from benchmarks.embedded_encoders import _cider
    from nofree.captioning import RetrievalCaptioner

    out = []
    for seed in range(seeds):
        captions, references = [], []
        for held, kept in photo_folds(len(split.pairs), 5, seed):
            captioner = RetrievalCaptioner(_pipeline(split, kept, *encoders, cache, **label), pool)
            captions += captioner.caption_embeddings(split.image_emb[held])
            references += [list(split.pairs[i].captions) for i in held.tolist()]
        out.append(_cider(captions, references))
    return out


def on_val(train: Split, val: Split, encoders, cache, pool, settings: dict[str, dict]) -> dict:
    """``val`` once: R@1 (with intervals) and retrieval CIDEr (per image) for each named setting,
    the paired CIDEr difference of each against the first, and a few photos to read."""
    from nofree.captioning import RetrievalCaptioner
    from nofree.eval import caption_metrics, paired_difference, r1_intervals, retrieval_report

    owner = val.owner
    references = [list(p.captions) for p in val.pairs]
    rows, per_image, captions = {}, {}, {}
    for name, label in settings.items():
        pipeline = _pipeline(train, None, *encoders, cache, **label)   # the last one: the bridge's
        sim = pipeline.similarity(val.image_emb, val.text_emb)
        report = retrieval_report(sim, owner)
        captions[name] = RetrievalCaptioner(pipeline, pool).caption_embeddings(val.image_emb)
        metrics = caption_metrics(captions[name], references, meteor=False)
        per_image[name] = metrics["CIDEr per image"]
        rows[name] = {"t2i R@1": report["t2i"]["R@1"], "i2t R@1": report["i2t"]["R@1"],
                      **r1_intervals(sim, owner), "CIDEr": metrics["CIDEr"]}
    first = next(iter(settings))
    for name in list(settings)[1:]:
        rows[name]["CIDEr vs " + first] = paired_difference(per_image[name], per_image[first])
    head = pipeline.asif.head
    logits = val.image_emb @ head.weight.T
    examples = [{"image": val.pairs[i].image.rsplit("/", 1)[-1],
                 "top classes": [head.names[j] for j in logits[i].topk(3).indices.tolist()],
                 **{name: captions[name][i] for name in settings},
                 "reference": val.pairs[i].captions[0]} for i in range(0, len(val.pairs), 5)]
    return {"rows": rows, "examples": examples, "n_photos": len(val.pairs), "n_captions": len(owner)}


def main(argv=None) -> dict:
    from nofree.anchors.labels import LABEL_DEFAULTS
    from nofree.cache import EmbeddingCache
    from nofree.captioning import default_pool_path
    from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
    from nofree.data.pairs import load_text_lines
    from nofree.registry import load_encoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="one fold seed, two grid cells, no val")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cache = EmbeddingCache()
    encoders = (load_encoder(DEFAULT_IMAGE_ENCODER), load_encoder(DEFAULT_TEXT_ENCODER))
    train = encode_split("train", *encoders, cache)
    seeds, cider_seeds = (1, 1) if args.smoke else (8, 3)
    grid = [(0.25, 0.0), (0.25, 2.0)] if args.smoke else \
        [(t, w) for t in TEMPERATURES for w in WEIGHTS if w > 0 or t == TEMPERATURES[0]]
    rows = {}
    for t in TEMPERATURES[:1] if args.smoke else TEMPERATURES:
        rows[f"label view alone, t = {t:g}"] = cross_validate(train, encoders, cache, seeds, label_only=True,
                                                              label_temperature=t)
    for t, w in grid:
        name = "plain ASIF (λ = 0)" if w == 0 else f"t = {t:g}, λ = {w:g}"
        rows[name] = cross_validate(train, encoders, cache, seeds, label_weight=w, label_temperature=t)
        print(f"{name}: {rows[name]}", flush=True)
    pool = load_text_lines(default_pool_path())
    t = LABEL_DEFAULTS["temperature"]
    cider = {f"{w:g}": retrieval_cider(train, encoders, cache, pool, cider_seeds, label_weight=w,
                                       label_temperature=t)
             for w in ((0.0, 2.0) if args.smoke else CIDER_WEIGHTS)}
    print(f"retrieval CIDEr by λ: {cider}", flush=True)
    out = {"rows": rows, "retrieval_cider": cider, "temperature": t, "defaults": dict(LABEL_DEFAULTS),
           "n_photos": len(train.pairs), "n_captions": len(train.owner), "seeds": seeds}
    if not args.smoke:
        val = encode_split("val", *encoders, cache)
        out["val"] = on_val(train, val, encoders, cache, pool, {
            "plain ASIF": {"label_weight": 0.0},
            "ASIF + label bridge (defaults)": {}})
        print(f"val: {out['val']['rows']}", flush=True)
    out["seconds"] = time.perf_counter() - t0
    if args.json:
        write_json(args.json, out)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def markdown(out: dict) -> str:
    seeds = out["seeds"]
    lines = [f"5-fold cross-validation over the {out['n_photos']} `train` photos ({out['n_captions']} captions; "
             f"anchors from the other four folds), {seeds} fold seed{'s' if seeds > 1 else ''}: mean of the "
             "per-seed CV R@1, lowest–highest seed in brackets. EfficientNet-Lite0 and all-MiniLM-L6-v2, "
             "nofree's ASIF defaults (centred, p = 2, CSLS K = 10); t: the softmax temperature over the head's "
             "logits, λ: the label term's weight.", "",
             "| similarity | CV t2i R@1 | CV i2t R@1 |", "| --- | --- | --- |"]
    spread = lambda v: f"{_mean(v):.3f} ({min(v):.3f}–{max(v):.3f})"  # noqa: E731
    lines += [f"| {name} | {spread(r['t2i R@1'])} | {spread(r['i2t R@1'])} |" for name, r in out["rows"].items()]
    lines += ["", f"Caption retrieval (bundled pool, CIDEr-D consensus of the top 50), t = {out['temperature']:g}, "
              "CV CIDEr per fold seed:", "", "| λ | CV CIDEr | per seed |", "| --- | --- | --- |"]
    lines += [f"| {w} | {100 * _mean(v):.1f} | {', '.join(f'{100 * c:.1f}' for c in v)} |"
              for w, v in out["retrieval_cider"].items()]
    if "val" in out:
        val = out["val"]
        lines += ["", f"`val`, looked at once ({val['n_photos']} photos, {val['n_captions']} captions; anchors: "
                  f"all 700 `train` pairs; defaults t = {out['defaults']['temperature']:g}, "
                  f"λ = {out['defaults']['weight']:g}); 95% bootstrap intervals over the photos:", "",
                  "| similarity | t2i R@1 | i2t R@1 | retrieval CIDEr | Δ CIDEr (paired 95% interval) |",
                  "| --- | --- | --- | --- | --- |"]
        for name, r in val["rows"].items():
            lo, hi = r["t2i R@1 interval"]
            lo2, hi2 = r["i2t R@1 interval"]
            diff = next((d for key, d in r.items() if key.startswith("CIDEr vs")), None)
            delta = "–" if diff is None else (f"{100 * diff['delta']:+.1f} ({100 * diff['interval'][0]:+.1f} to "
                                             f"{100 * diff['interval'][1]:+.1f}; ahead in {100 * diff['ahead']:.0f}%)")
            lines.append(f"| {name} | {r['t2i R@1']:.3f} ({lo:.3f}–{hi:.3f}) | {r['i2t R@1']:.3f} "
                         f"({lo2:.3f}–{hi2:.3f}) | {100 * r['CIDEr']:.1f} | {delta} |")
        names = list(val["rows"])
        lines += ["", "Every fifth `val` photo: the head's top 3 ImageNet classes and the retrieved captions:", "",
                  "| photo | top classes | " + " | ".join(names) + " | a reference |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]
        lines += [f"| {e['image']} | {', '.join(e['top classes'])} | " + " | ".join(e[n] for n in names)
                  + f" | {e['reference']} |" for e in val["examples"]]
    lines.append(f"\n{out['seconds']:.0f} s.")
    return "\n".join(lines)


NOTES = """What it says:
- **The classifier's own words carry as much as the anchors.** The label view alone, with no
  anchor in the similarity, reaches CV text→image R@1 0.618 at t = 0.25, above plain ASIF's 0.585
  over 700 anchors: EfficientNet-Lite0's 1,000 ImageNet names, embedded by MiniLM, place a photo
  in the text space about as well as its nearest anchor photos do.
- **The two are complementary.** Added to ASIF they give 0.708 t2i (lowest–highest fold seed
  0.667–0.744) and 0.671 i2t at t = 0.25, λ = 2, against 0.585 and 0.588: every fold seed gains
  9–12 points in t2i. The temperature matters little (t = 0.125–0.5 within 0.011 at λ = 2);
  t2i rises up to λ = 2–3, i2t peaks at λ = 1–1.5.
- **Caption retrieval gains most**, the use that carries MAGIC's examples and candidates and
  SmallCap-style's prompts: CV CIDEr 50.6 → 62.1 at λ = 2, on every fold seed; λ = 3 gives 61.7.
  The defaults (`nofree.anchors.labels.LABEL_DEFAULTS`) are t = 0.25, λ = 2, the best t2i cell
  and the best retrieval CIDEr.
- **`val`, looked at once**, agrees: t2i R@1 0.575 → 0.680 (95% interval 0.570–0.785), i2t
  0.550 → 0.625, retrieval CIDEr 48.7 → 65.8, a paired difference of +17.1 (+2.0 to +31.8).
- **Reading the photos.** The head's top classes are often wrong in ImageNet's own terms
  (giraffes read as ostrich / camel / llama, a doughnut factory as a bakery), but their names
  land near the right region of the text space ("animals at a zoo"), which is what the
  similarity needs. ImageNet-1k has no class for a person: photos about people are read through
  objects (crutch, potter's wheel) or scenery, and there the bridge can pull the caption towards
  an animal (two riders on a beach, read as "Arabian camel, seashore", retrieve "a wet dog
  standing on a beach").
- Cost: one 1280 × 1000 product and one 1000 × 384 product per photo, and the 1,000 class names
  embedded once per pipeline (cached).

**SmallCap-style in cross-validation with the bridge** (the recipe-CV section's protocol and
default recipe; its adapters retrained, since their retrieved examples change):
`python -m benchmarks.recipe_cv --kind smallcap --keep-adapters --work runs/bench/rcv_sc_bridge
--decodings b3n3 b3n3d2k3r`, 2026-12-07, on the same 2-core machine while other benchmarks ran
(training 273–1018 s a fold). Held-out CIDEr, mean ± sd over the 5 folds:

| decoding | CV CIDEr | per fold | − retrieval per fold | over the 140 photos (paired 95% interval) |
| --- | --- | --- | --- | --- |
| retrieval (training-free) | 69.3 ± 11.1 | 73.4 / 59.6 / 59.7 / 67.5 / 86.1 | – | – |
| SmallCap-style, own 3-beam caption (`b3n3`) | 57.2 ± 10.9 | 52.9 / 44.6 / 55.6 / 58.5 / 74.4 | −12.1 ± 6.2 (0 of 5 ahead) | −12.1 (−19.5 to −4.9) |
| SmallCap-style defaults (`b3n3d2k3r`) | 72.9 ± 10.9 | 71.6 / 63.2 / 62.2 / 80.4 / 87.4 | +3.7 ± 5.5 (4 of 5 ahead) | +3.7 (+0.2 to +7.5; ahead in 98% of draws) |

With plain ASIF the same defaults tied retrieval (+1.4 ± 4.9, −2.9 to +5.4). With the bridge's
examples the trained adapter's consensus choice is ahead of retrieval over the 140 held-out
photos, its interval clear of 0, though not in every fold; its own single caption stays 12
behind, so the gain is in choosing among its drafts, its n-best and the retrieved caption.

The same folds with training seed 1 (`... --seed 1 --decodings b3n3 b3n3d2k3r`, 2026-12-07,
training 417–632 s a fold beside other jobs; retrieval 68.6 ± 11.1, 72.8 / 59.6 / 59.7 / 65.1 /
86.0, up to 2.4 below the run above on three folds; each run compares within itself): the defaults
score 72.7 ± 13.5 (69.4 / 60.7 / 61.9 / 78.1 / 93.4), +4.0 ± 6.3 per fold over retrieval (4 of 5
ahead), +4.0 over the 140 photos (95% interval +1.0 to +7.4); the adapter's own 3-beam caption
68.4 ± 13.7, level with retrieval (−0.2, −6.4 to +5.6), where seed 0's trailed by 12. The seed
moves the adapter's own captions a lot and its consensus choice little: both seeds put the
defaults 4 ahead of retrieval in cross-validation. On `val` (fusion section) three seeds give
66.0 ± 6.7 against retrieval's 65.8 (72.6, 59.3, 66.2): 40 photos cannot resolve a 4-point
lead."""


if __name__ == "__main__":
    main()
