"""``nofree train`` and ``nofree eval``: trained adapters on the frozen backbones, and one report
for every method (each command a thin shell over one library function)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from nofree.cli_options import (ADAPTER_DIR, ANCHOR_DIR, PAIRS, candidate_options, clean_pool_option,
                                label_weight_option, scorer_option)
from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_LM, DEFAULT_TEXT_ENCODER


# --- training -----------------------------------------------------------------------------
def _train_options(f):
    f = click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint in --out.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--device", default="cpu", show_default=True)(f)
    f = click.option("--val-split", default="val", show_default=True,
                     help="Split scored each epoch ('' to skip validation).")(f)
    f = click.option("--train-split", default="train", show_default=True)(f)
    f = click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
                     help="Training arithmetic: bf16 autocast (default for clipcap/flamingo) or fp32.")(f)
    from nofree.adapters.recipes import AUGMENTATIONS, describe

    f = click.option("--augment", type=click.Choice(AUGMENTATIONS), default=None,
                     help="Extra views of each training photo, encoded once: hflip mirrors it, crops "
                          "adds four corner crops of 80% of each side to the mirrored view "
                          f"(default depends on the method: {describe('augment')}).")(f)
    f = click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help=f"Learning rate (default depends on the method: {describe('lr')}).")(f)
    f = click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help=f"Pairs per step (default depends on the method: {describe('batch_size')}).")(f)
    f = click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help=f"Passes over the training pairs (default depends on the method: "
                          f"{describe('epochs')}; raised on small sets to train at least "
                          f"{describe('min_steps')} steps).")(f)
    f = click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint directory.")(f)
    f = click.option("--image-encoder", default=DEFAULT_IMAGE_ENCODER, show_default=True)(f)
    f = click.option("--pairs", required=True, type=PAIRS, help="Training pairs (the forms anchors "
                     "build takes).")(f)
    return f


@click.command()
@click.argument("method", type=click.Choice(["lit", "clipcap", "flamingo", "smallcap"]))
@_train_options
@click.option("--text-encoder", default=DEFAULT_TEXT_ENCODER, show_default=True,
              help="LiT's text side; SmallCap's anchors' text side.")
@click.option("--lm", default=DEFAULT_LM, show_default=True, help="Frozen LM (clipcap, flamingo, smallcap).")
@click.option("--anchors", "anchor_dir", type=ANCHOR_DIR,
              help="SmallCap: anchor set to retrieve with (default: built from --train-split).")
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="SmallCap: caption pool to retrieve from (default: the bundled 24k COCO captions).")
@clean_pool_option
@click.option("--mapper", type=click.Choice(["mlp", "transformer"]), default="mlp", show_default=True,
              help="ClipCap: the mapper from the image embedding to the LM prefix.")
def train(method, pairs, image_encoder, out, epochs, batch_size, lr, augment, precision, train_split,
          val_split, device, seed, overwrite, resume, text_encoder, lm, anchor_dir, pool, mapper,
          clean_pool):
    """Train a light adapter (LiT, ClipCap, Flamingo-style or SmallCap-style) on frozen backbones."""
    from nofree.adapters import train_clipcap, train_flamingo, train_lit, train_smallcap

    if method != "smallcap" and (anchor_dir is not None or pool is not None or not clean_pool):
        raise click.UsageError("--anchors, --pool and --raw-pool are SmallCap's options (train smallcap)")
    if method != "clipcap" and mapper != "mlp":
        raise click.UsageError("--mapper is ClipCap's option (train clipcap)")

    tuned = {key: value for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                                           ("augment", augment), ("precision", precision))
             if value is not None}
    common = dict(out=out, image_encoder=image_encoder, train_split=train_split,
                  val_split=val_split or None, device=device, seed=seed, overwrite=overwrite,
                  resume=resume, **tuned)
    if method == "lit":
        result = train_lit(pairs, text_encoder=text_encoder, **common)
    elif method == "smallcap":
        result = train_smallcap(pairs, text_encoder=text_encoder, lm=lm, anchors=anchor_dir, pool=pool,
                                clean_pool=clean_pool, **common)
    elif method == "clipcap":
        result = train_clipcap(pairs, lm=lm, mapper=mapper, **common)
    else:
        result = train_flamingo(pairs, lm=lm, **common)
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
    click.echo(f"wrote {result.out_dir} ({result.steps} steps; last epoch: {summary})")


# --- evaluation ---------------------------------------------------------------------------
@click.command("eval")
@click.option("--pairs", required=True, type=PAIRS,
              help="Pairs (JSONL/CSV/folder/webdataset shards) holding the evaluation split.")
@click.option("--split", default="val", show_default=True, help="Split to evaluate ('' for all pairs).")
@click.option("--method", "methods", multiple=True, type=click.Choice(
    ["asif", "lit", "retrieval", "magic", "magic-lit", "clipcap", "flamingo", "smallcap"]),
    help="Method to run (repeatable; default: every method whose inputs are given).")
@click.option("--anchors", "anchor_dir", type=ANCHOR_DIR,
              help="Anchor set (default: built from --anchor-split of --pairs into REPORT/anchors).")
@click.option("--anchor-split", default="train", show_default=True)
@click.option("--lit", "lit_dir", type=ADAPTER_DIR)
@click.option("--clipcap", "clipcap_dir", type=ADAPTER_DIR)
@click.option("--flamingo", "flamingo_dir", type=ADAPTER_DIR)
@click.option("--smallcap", "smallcap_dir", type=ADAPTER_DIR)
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Caption pool for retrieval and MAGIC's examples (default: the bundled 24k captions).")
@clean_pool_option
@click.option("--lm", default=DEFAULT_LM, show_default=True, help="Language model for MAGIC.")
@scorer_option("Scorer of the magic row: asif (ASIF over the anchors; the default), open_clip:ARCH@TAG, "
               "hf-clip:NAME, local:DIR (a saved CLIP) or lit:DIR (a trained LiT adapter). All but asif rank "
               "the --pool captions themselves (CLIPRe; no anchors) and steer with the MAGIC paper's "
               "alpha=0.1, beta=2.")
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Zero-shot classes, one a line (default: the pairs' 'categories').")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N images of the split.")
@click.option("--samples", type=click.IntRange(min=0), default=6, show_default=True,
              help="Photos in the sample-caption grid.")
@click.option("--beams", type=click.IntRange(min=1), default=None,
              help="Beam width of the trained captioners (default: their tuned decoding).")
@click.option("--no-repeat-ngram", type=click.IntRange(min=0), default=None,
              help="Trained captioners: no token n-gram of this size twice in a caption (0: off).")
@click.option("--nbest", type=click.IntRange(min=1), default=None,
              help="Trained captioners: keep the beam search's N best captions and choose among them by "
                   "consensus (at most --beams; default: their tuned decoding).")
@candidate_options
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (saves ~10 s a method).")
@click.option("--baseline", type=click.Choice(["retrieval", "magic", "magic-lit", "clipcap", "flamingo", "smallcap"]),
              default=None, help="Captioning method the others' CIDEr is compared to, with a paired bootstrap "
              "interval over the images (default: retrieval when it runs).")
@label_weight_option
@click.option("--report", "report_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Keep the finished methods of an earlier run in --report whose "
              "inputs (anchors, pool, adapter, settings) are unchanged; rerun the others.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier report in --report.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def eval_command(pairs, split, methods, anchor_dir, anchor_split, lit_dir, clipcap_dir, flamingo_dir, smallcap_dir, pool,
                 lm, scorer, labels_file, limit, samples, beams, no_repeat_ngram, nbest, drafts, consensus,
                 with_retrieved, no_meteor, baseline, label_weight,
                 report_dir,
                 resume, overwrite, batch_size, device, clean_pool):
    """Evaluate fusion methods on one split and write a report (results.json, results.md, plots)."""
    from nofree.data.pairs import load_labels
    from nofree.eval.report import EvalConfig, run_eval

    adapters = {kind: d for kind, d in (("lit", lit_dir), ("clipcap", clipcap_dir), ("flamingo", flamingo_dir),
                                        ("smallcap", smallcap_dir)) if d is not None}
    config = EvalConfig(pairs=pairs, split=split or None, limit=limit, anchors=anchor_dir,
                        anchor_split=anchor_split, adapters=adapters, pool=pool, clean_pool=clean_pool, lm=lm,
                        scorer=scorer,
                        labels=load_labels(labels_file) if labels_file else None,
                        batch_size=batch_size, device=device, meteor=not no_meteor, baseline=baseline,
                        label_weight=label_weight,
                        decoding={k: v for k, v in (("beams", beams), ("no_repeat_ngram", no_repeat_ngram),
                                                    ("nbest", nbest)) if v is not None},
                        candidates={k: v for k, v in (("drafts", drafts), ("consensus", consensus),
                                                      ("with_retrieved", with_retrieved)) if v is not None})
    results = run_eval(config, methods or None, out_dir=report_dir, overwrite=overwrite, resume=resume,
                       samples=samples, echo=lambda line: click.echo(line, err=True))
    click.echo((report_dir / "results.md").read_text(encoding="utf-8"))
    if any(entry["status"] != "ok" for entry in results["methods"].values()):
        sys.exit(1)
