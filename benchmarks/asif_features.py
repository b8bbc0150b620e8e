"""How the image side is read and how anchors are formed: ASIF retrieval on coco-mini ``train``.

The other ASIF benchmarks take each encoder's ``encode`` as given (average-pooled last conv map of
the centre crop) and one anchor per (photo, caption) pair. This one asks whether text→image R@1
moves with cheap changes to either, with nofree's ASIF defaults otherwise (centred, CSLS):

- test-time views: the horizontally flipped photo, the whole photo squashed to the input size
  (no crop), their L2-normalised embeddings averaged with the centre crop's;
- pooling of the last conv map: generalised mean (GeM, Radenović et al. (2018), "Fine-tuning CNN
  Image Retrieval with No Human Annotation") with p = 2 and 3, and max pooling;
- both embedded image encoders at once: EfficientNet-Lite0 and -Lite2 features concatenated
  (each L2-normalised; the joint vector normalised again);
- photo-level anchors: one anchor per photo (its image, the normalised mean of its 5 caption
  embeddings) instead of five pairs sharing one image;
- the power p and the top-k of the relative representation, re-gridded *with* CSLS on (the
  48-setting grid of ``asif_quality`` chose them without it).

Cross-validation only (5 round-robin folds of :func:`benchmarks.folds.photo_folds` over the 140
train photos, anchors from the other four folds): ``val`` is not looked at. Every encoding is
computed once per view and kept in memory.

    python -m benchmarks.asif_features [--json PATH] [--smoke]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks import write_json
from benchmarks.asif_quality import Split, anchors_of, encode_split, fold_recalls
from benchmarks.folds import photo_folds

IMAGE_SPECS = ("embedded:effnet-lite0", "embedded:effnet-lite2")
VIEWS = ("crop", "flip", "squash")


def view_maps(encoder, images) -> dict[str, torch.Tensor]:
    """Last conv maps ``(n, T, C)`` of the centre crop, the flipped photo and the whole photo
    squashed to the encoder's input size."""
    from PIL import Image, ImageOps

    size = encoder.image_size
    views = {"crop": images, "flip": [ImageOps.mirror(im) for im in images],
             "squash": [im.resize((size, size), Image.Resampling.BICUBIC) for im in images]}
    return {name: encoder.encode_tokens(items) for name, items in views.items()}


def pooled(tokens: torch.Tensor, how: str) -> torch.Tensor:
    """``(n, T, C)`` -> ``(n, C)`` L2-normalised: ``avg``, ``max`` or ``gemP`` (generalised mean)."""
    from nofree.core import l2_normalize

    if how == "avg":
        out = tokens.mean(1)
    elif how == "max":
        out = tokens.amax(1)
    else:
        p = float(how.removeprefix("gem"))
        out = tokens.clamp(min=1e-6).pow(p).mean(1).pow(1.0 / p)
    return l2_normalize(out)


def photo_anchors(split: Split, rows: torch.Tensor):
    """One anchor per photo of ``rows``: its image, the mean of its captions' embeddings."""
    from nofree.anchors.anchor_set import AnchorSet
    from nofree.core import l2_normalize

    base = anchors_of(split, rows)
    text = torch.stack([l2_normalize(split.text_emb[split.owner == i].mean(0)) for i in rows.tolist()])
    return AnchorSet(split.image_emb[rows], text, tuple(split.pairs[i].captions[0] for i in rows.tolist()),
                     base.image_spec, base.text_spec)


def cross_validate(split: Split, params: dict, anchors=anchors_of, folds: int = 5,
                   seed: int = 0) -> dict[str, float]:
    """Mean t2i and i2t R@1 over the folds (ASIF with ``params`` over nofree's defaults)."""
    from nofree.anchors.asif import ASIF, ASIF_DEFAULTS

    def variant(anchor_set):
        asif = ASIF(**{**ASIF_DEFAULTS, **params}).fit(anchor_set)
        return asif.similarity
    return fold_recalls(split, variant, anchors=anchors, folds=folds, seed=seed)


def retrieval_cider(split: Split, image_encoder, text_encoder, cache, pool, p: float, seed: int) -> float:
    """Cross-validated CIDEr of nofree's caption retrieval with the ASIF power ``p``."""
    from benchmarks.embedded_encoders import _anchors, _cider
    from nofree.anchors.pipeline import AsifPipeline
    from nofree.captioning import RetrievalCaptioner

    captions, references = [], []
    for held, kept in photo_folds(len(split.pairs), 5, seed):
        pipeline = AsifPipeline.from_anchors(_anchors(split, kept, image_encoder.spec, text_encoder.spec),
                                             image_encoder, text_encoder, cache=cache, p=p, label_weight=0.0)
        captions += RetrievalCaptioner(pipeline, pool).caption_embeddings(split.image_emb[held])
        references += [list(split.pairs[i].captions) for i in held.tolist()]
    return _cider(captions, references)


def main(argv=None) -> dict:
    from nofree.cache import EmbeddingCache
    from nofree.core import DEFAULT_TEXT_ENCODER, l2_normalize
    from nofree.data.images import load_image
    from nofree.registry import load_encoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="the default encoder and two rows only")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cache = EmbeddingCache()
    text_encoder = load_encoder(DEFAULT_TEXT_ENCODER)
    specs = IMAGE_SPECS[:1] if args.smoke else IMAGE_SPECS
    base, maps = None, {}
    for spec in specs:
        encoder = load_encoder(spec)
        split = encode_split("train", encoder, text_encoder, cache)
        base = base or split
        maps[spec] = view_maps(encoder, [load_image(p.image) for p in split.pairs])

    def image_side(spec: str, views=("crop",), how: str = "avg") -> torch.Tensor:
        return l2_normalize(sum(pooled(maps[spec][v], how) for v in views))

    def with_images(image_emb: torch.Tensor) -> Split:
        return Split(image_emb, base.text_emb, base.owner, base.pairs)

    lite0 = IMAGE_SPECS[0]
    rows: dict[str, dict] = {}
    plan = [("nofree's defaults (Lite0, centre crop, average pool, pair anchors)", image_side(lite0), {}, anchors_of),
            ("+ flipped view averaged", image_side(lite0, ("crop", "flip")), {}, anchors_of)]
    if not args.smoke:
        plan += [
            ("+ whole-photo (squashed) view averaged", image_side(lite0, ("crop", "squash")), {}, anchors_of),
            ("+ flipped and squashed views averaged", image_side(lite0, VIEWS), {}, anchors_of),
            ("whole photo squashed instead of the crop", image_side(lite0, ("squash",)), {}, anchors_of),
            ("GeM pooling, p = 2", image_side(lite0, how="gem2"), {}, anchors_of),
            ("GeM pooling, p = 3", image_side(lite0, how="gem3"), {}, anchors_of),
            ("max pooling", image_side(lite0, how="max"), {}, anchors_of),
            ("Lite2 instead of Lite0", image_side(IMAGE_SPECS[1]), {}, anchors_of),
            ("Lite2, + flipped view averaged", image_side(IMAGE_SPECS[1], ("crop", "flip")), {}, anchors_of),
            ("Lite0 and Lite2 features concatenated",
             l2_normalize(torch.cat([image_side(lite0), image_side(IMAGE_SPECS[1])], 1)), {}, anchors_of),
            ("photo-level anchors (mean of the 5 caption embeddings)", image_side(lite0), {}, photo_anchors),
        ]
        for p in (1.0, 1.5, 2.0, 3.0):
            for k in (56, 112, 224, None):
                if p == 2.0 and k is None:
                    continue  # the defaults' own row
                plan.append((f"p = {p:g}, k = {'min(800, N)' if k is None else k}", image_side(lite0),
                             {"p": p, "k": k}, anchors_of))
    for name, image_emb, params, anchors in plan:
        rows[name] = cross_validate(with_images(image_emb), params, anchors)
        print(f"{name}: {rows[name]}", flush=True)
    # the power p over several fold seeds: does the best cell above survive other folds?
    powers, seeds = ((1.5, 2.0), 2) if args.smoke else ((1.0, 1.25, 1.5, 1.75, 2.0, 2.5), 8)
    sweep = {}
    for p in powers:
        cells = [cross_validate(with_images(image_side(lite0)), {"p": p}, seed=seed) for seed in range(seeds)]
        sweep[f"{p:g}"] = {key: [c[key] for c in cells] for key in ("t2i R@1", "i2t R@1")}
    print(f"p over {seeds} fold seeds: {sweep}", flush=True)
    from nofree.captioning import default_pool_path
    from nofree.data.pairs import load_text_lines

    pool = load_text_lines(default_pool_path())
    cider_seeds = 1 if args.smoke else 3
    lite0_encoder = load_encoder(lite0)
    cider = {f"{p:g}": [retrieval_cider(base, lite0_encoder, text_encoder, cache, pool, p, seed)
                        for seed in range(cider_seeds)] for p in (1.5, 2.0)}
    print(f"retrieval CIDEr: {cider}", flush=True)
    out = {"rows": rows, "p_sweep": sweep, "retrieval_cider": cider, "n_photos": len(base.pairs),
           "n_captions": len(base.owner), "seconds": time.perf_counter() - t0}
    if args.json:
        write_json(args.json, out)
    return out


def markdown(out: dict) -> str:
    lines = [f"5-fold cross-validation over the {out['n_photos']} `train` photos ({out['n_captions']} "
             "captions; anchors from the other four folds), text encoder all-MiniLM-L6-v2, nofree's ASIF "
             "defaults (centred, p = 2, k = min(800, N), CSLS K = 10) unless the row says otherwise. "
             "`val` not used.", "",
             "| variant | CV t2i R@1 | CV i2t R@1 |", "| --- | --- | --- |"]
    lines += [f"| {name} | {r['t2i R@1']:.3f} | {r['i2t R@1']:.3f} |" for name, r in out["rows"].items()]
    sweep = out["p_sweep"]
    seeds = len(next(iter(sweep.values()))["t2i R@1"])
    spread = lambda v: f"{sum(v) / len(v):.3f} ({min(v):.3f}–{max(v):.3f})"  # noqa: E731
    lines += ["", f"The power p over {seeds} fold seeds (the same 5-fold protocol, photos shuffled with seeds "
              f"0–{seeds - 1}; mean of the per-seed CV R@1, lowest–highest seed in brackets):", "",
              "| p | CV t2i R@1 | CV i2t R@1 |", "| --- | --- | --- |"]
    lines += [f"| {p} | {spread(r['t2i R@1'])} | {spread(r['i2t R@1'])} |" for p, r in sweep.items()]
    cider = out["retrieval_cider"]
    lines += ["", "Caption retrieval (CIDEr-D consensus of the top 50, bundled pool), CV CIDEr per fold seed: "
              + "; ".join(f"p = {p}: " + ", ".join(f"{100 * c:.1f}" for c in v) for p, v in cider.items()) + "."]
    return "\n".join(lines)


NOTES = """What it says:
- **Nothing here brings text→image R@1 near 0.65.** The variants span 0.510–0.586 in CV t2i R@1
  around the defaults' 0.557 (one fold seed); the spread between fold seeds of one setting is
  wider than that (p = 2: 0.557–0.620 over eight seeds).
- **Test-time views do not help.** Averaging the flipped view or the whole (squashed) photo with
  the centre crop lowers t2i R@1 slightly and i2t R@1 more: the anchors are centre crops, and an
  averaged query moves away from them. Squashing instead of cropping is worse still.
- **Pooling**: the encoder's own average pooling is best for t2i; GeM and max pooling weight a
  few strong activations (a reading, not measured: whole-scene captions need the whole map).
- **Both image encoders at once** (Lite0 and Lite2 concatenated) gains 0.011 t2i and 0.014 i2t,
  within the noise, for three times Lite0's encoding cost.
- **Photo-level anchors** (one averaged caption per photo) lose 0.02 t2i and 0.08 i2t: the five
  captions of a photo, kept apart, give the relative representation more to match.
- **The power p, over eight fold seeds**: p = 1.25–1.75 is a little above the default 2 in both
  directions (t2i 0.589–0.594 against 0.585; i2t 0.605–0.635 against 0.588), i2t the more
  consistently. Caption retrieval, the use that carries MAGIC and SmallCap-style, does not
  move: CV CIDEr 52.6 / 47.5 / 51.3 with p = 1.5 against 52.4 / 49.0 / 50.0 with p = 2 on
  three fold seeds (mean 50.5 both). The default stays p = 2: a change every caption number
  rests on needs a gain there, and this one is within the noise.
- With 700 anchors and these two small unimodal encoders, ASIF text→image R@1 sits near
  0.55–0.60 however the image side is read; the encoder grid finds the same. What moves it is
  another source of words: the image encoder's own class names (the label bridge, next
  section), with which CV t2i R@1 reaches 0.71."""


if __name__ == "__main__":
    main()
