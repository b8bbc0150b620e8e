"""``nofree demo``: the training-free composition end to end, offline, on the bundled sample.

1. Build (or reuse) an ASIF anchor set from the sample's ``train`` split (140 photos × 5
   captions = 700 anchors) with two unrelated frozen encoders: EfficientNet-Lite0 (ImageNet
   classifier) for images and all-MiniLM-L6-v2 for text. Images and texts are compared by ASIF
   plus the label bridge (:mod:`nofree.anchors.labels`: the image encoder's ImageNet classes,
   read as text).
2. For a few held-out ``val`` photos: zero-shot COCO categories, the caption retrieved from a
   24k-caption pool that shares no image with the sample, and a caption written by a frozen
   SmolLM2 with nofree's MAGIC defaults (the pool's best captions for the photo as in-context
   examples) — beside a human reference.
3. Text→image retrieval among the held-out photos for a few queries.

Embeddings go through the on-disk cache, so a second run takes seconds.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_LM, DEFAULT_TEXT_ENCODER

QUERIES = ("a dog playing outside", "a plate of food on a table", "a train at a station")


def run_demo(*, n_images: int = 4, device: str = "cpu", workdir: str | Path = "runs/demo",
             magic: bool = True, echo: Callable[[str], None] = print,
             image_encoder: str = DEFAULT_IMAGE_ENCODER, text_encoder: str = DEFAULT_TEXT_ENCODER,
             lm: str = DEFAULT_LM, pool_limit: int | None = None) -> dict:
    """Run the demo, printing as it goes; returns what it printed as data (for tests).

    The model specs and ``pool_limit`` (first N pool captions; None: all) exist so that tests
    can run the same code on tiny models; an anchor set already in ``workdir`` is reused.
    """
    import json

    from nofree import sample_dir
    from nofree.anchors.anchor_set import AnchorSet
    from nofree.anchors.build import build_anchor_set
    from nofree.anchors.pipeline import AsifPipeline, top_k_rows
    from nofree.cache import EmbeddingCache
    from nofree.captioning.retrieval import RetrievalCaptioner
    from nofree.data.pairs import load_pairs, load_text_lines
    from nofree.data.pool import default_pool_path

    start = time.perf_counter()
    sample = sample_dir()
    workdir = Path(workdir)
    anchor_dir = workdir / "anchors"
    if (anchor_dir / "manifest.json").exists():
        echo(f"reusing the anchor set in {anchor_dir}")
    else:
        echo(f"building an anchor set from {sample / 'pairs.jsonl'} (train split) -> {anchor_dir}")
        build_anchor_set(sample / "pairs.jsonl", split="train", image_encoder=image_encoder,
                         text_encoder=text_encoder, out=anchor_dir, device=device)
    anchors = AnchorSet.load(anchor_dir)
    echo(f"{anchors}\n")

    cache = EmbeddingCache()
    pipeline = AsifPipeline.load(anchor_dir, device=device, cache=cache)
    if pipeline.label_settings["label_weight"]:
        echo(f"image-text similarity: ASIF + the label bridge (the image encoder's ImageNet classes read as "
             f"text, weight {pipeline.label_settings['label_weight']:g})\n")
    val = load_pairs(sample / "pairs.jsonl", split="val")
    shown = val[:: max(1, len(val) // n_images)][:n_images]
    image_emb = pipeline.encode_images([p.image for p in shown])

    labels = json.loads((sample / "coco_categories.json").read_text())
    top = top_k_rows(pipeline.classify(image_emb, labels), labels, 3)
    echo("encoding the caption pool (cached after the first run) ...")
    retrieval = RetrievalCaptioner(pipeline, load_text_lines(default_pool_path())[:pool_limit])
    retrieved = retrieval.caption_embeddings(image_emb)
    magic_captions = _magic_captions(pipeline, retrieval, lm, shown, device, echo) if magic else None

    results = []
    for i, pair in enumerate(shown):
        echo(f"\n{Path(pair.image).name}")
        truth = ", ".join(pair.meta.get("categories", [])[:6]) or "(not annotated)"
        labels_shown = ", ".join(f"{r['label']} ({r['score']:.2f})" for r in top[i])
        echo(f"  zero-shot    {labels_shown}   [true: {truth}]")
        echo(f"  retrieval    {retrieved[i]}")
        if magic_captions is not None:
            echo(f"  MAGIC        {magic_captions[i]}")
        echo(f"  reference    {pair.captions[0]}")
        results.append({"image": pair.image, "zero_shot": top[i], "retrieval": retrieved[i],
                        "magic": magic_captions[i] if magic_captions else None})

    val_emb = pipeline.encode_images([p.image for p in val])
    sim = pipeline.similarity(val_emb, pipeline.encode_texts(list(QUERIES)))  # (n_val, n_queries)
    echo("\ntext -> image among the held-out photos:")
    for q, query in enumerate(QUERIES):
        best = int(sim[:, q].argmax())
        echo(f"  {query!r:34} -> {Path(val[best].image).name}: {val[best].captions[0]}")
    echo(f"\ndone in {time.perf_counter() - start:.0f} s (embedding cache: {cache.root})")
    return {"anchors": len(anchors), "images": results}


def _magic_captions(pipeline, retrieval, lm, pairs, device, echo) -> list[str]:
    """Captions with nofree's MAGIC defaults: the embedded LM writes one caption per window of
    in-context examples from the pool, and the one agreeing most with the retrieved captions is kept."""
    from nofree.captioning.drafts import MagicCaptioner

    echo("captioning with MAGIC (frozen SmolLM2, retrieved in-context examples, 8 drafts per photo) ...")
    # in-context examples ranked by embedding consensus, as MAGIC's defaults were tuned
    captioner = MagicCaptioner.from_pipeline(pipeline, lm=lm, device=device,
                                             pool=retrieval.with_consensus("embedding"))
    return captioner.caption([p.image for p in pairs])
