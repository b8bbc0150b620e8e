"""Option pieces of nofree's commands: the pairs-source type, the output format, the
caption-pool cleaning switch, the ``--strict`` switch, and MAGIC's ``--scorer`` and ``--windows``."""
from __future__ import annotations

import os
from pathlib import Path

import click

#: ``--format`` choices of every command that prints results
FORMATS = ("table", "jsonl", "json")
#: other names accepted for a format (``text`` means ``table``: ``anchors info --format text`` works)
FORMAT_ALIASES = {"text": "table"}


class PairsSource(click.ParamType):
    """``--pairs``: an existing file or folder, or webdataset shards named by a brace pattern
    (``shards/{00000..00099}.tar``) or several joined by ``::``. Paths come back as ``Path``,
    patterns as ``str`` (:func:`nofree.data.pairs.load_pairs` reads both)."""

    name = "pairs"

    def convert(self, value, param, ctx):
        if isinstance(value, Path):
            return value
        from nofree.data.webdataset import is_shard_pattern

        text = os.fspath(value)
        if is_shard_pattern(text):
            return text
        path = Path(text)
        if not path.exists():
            self.fail(f"{text!r} does not exist: give a pairs file (.jsonl, .csv), an image folder, "
                      "webdataset shards (a .tar, a folder of them) or a shard pattern like "
                      "'shards/{00000..00099}.tar' (quoted, so the shell leaves the braces)", param, ctx)
        return path


PAIRS = PairsSource()


class ArtifactDir(click.ParamType):
    """The folder of an anchor set or an adapter: an existing folder (a ``Path``), or
    ``hf-hub:ORG/NAME[@REVISION]`` (a ``str``, checked for form here and fetched by the library
    through :func:`nofree.hub.resolve_dir`)."""

    name = "dir"

    def __init__(self, what: str) -> None:
        self.what = what

    def get_metavar(self, param, ctx=None) -> str:
        return "DIR|hf-hub:ORG/NAME"

    def convert(self, value, param, ctx):
        if isinstance(value, Path):
            return value
        text = os.fspath(value)
        from nofree.hub import is_hub_ref, parse_hub_ref

        if is_hub_ref(text):
            from nofree.core import SpecError

            try:
                parse_hub_ref(text)
            except SpecError as err:
                self.fail(str(err), param, ctx)
            return text
        path = Path(text)
        if not path.is_dir():
            hint = "is a file" if path.exists() else "does not exist"
            self.fail(f"{text!r} {hint}: give the folder of {self.what}, or hf-hub:ORG/NAME[@REVISION] "
                      "for one on the Hugging Face Hub", param, ctx)
        return path


ANCHOR_DIR = ArtifactDir("an anchor set (`nofree anchors build`)")
ADAPTER_DIR = ArtifactDir("a trained adapter (`nofree train`)")


class FormatChoice(click.Choice):
    """``--format table|jsonl|json`` (or a subset), also accepting :data:`FORMAT_ALIASES`."""

    def __init__(self, choices=FORMATS) -> None:
        super().__init__(list(choices))

    def convert(self, value, param, ctx):
        value = FORMAT_ALIASES.get(value, value)
        return super().convert(value, param, ctx)


def format_option(choices=FORMATS, default: str = "table", help: str | None = None):
    """The ``--format`` option (parameter name ``fmt``)."""
    text = help or ("table: aligned columns for reading; jsonl: one JSON object a line, written as "
                    "each result is ready; json: one JSON document at the end.")
    return click.option("--format", "fmt", type=FormatChoice(choices), default=default,
                        show_default=True, help=text)


def clean_pool_option(f):
    """``--clean-pool/--raw-pool`` (parameter ``clean_pool``) of every command taking ``--pool``."""
    return click.option("--clean-pool/--raw-pool", "clean_pool", default=True, show_default=True,
                        help="Drop the caption pool's non-captions (refusals like 'I am unable to see "
                             "an image', task text, placeholders, links), lines under 2 or over 60 "
                             "words, lines with a word typed twice ('with with') and repeats first, "
                             "with one warning giving the counts; --raw-pool uses every line as it is.")(f)


def label_weight_option(f):
    """``--label-weight`` (parameter ``label_weight``) of every command comparing images and texts
    through an anchor set: the weight of the image encoder's label bridge (:mod:`nofree.anchors.labels`)."""
    return click.option("--label-weight", type=click.FloatRange(min=0), default=None,
                        help="Weight of the label bridge added to ASIF: the image encoder's own ImageNet "
                             "classes, read as text (0: plain ASIF; default: nofree's cross-validated 2; "
                             "image encoders without a classifier head always use plain ASIF).")(f)


def strict_option(f):
    """``--strict`` (parameter ``strict``) of every command reading images: stop at the first
    unreadable one instead of skipping it."""
    return click.option("--strict", is_flag=True, help="Stop at the first unreadable image with an "
                        "error naming it (default: skip it, report it at the end, go on).")(f)


def _parse_scorer(ctx, param, value):
    """``--scorer SPEC`` checked and normalised (:func:`nofree.scoring.normalize_scorer_spec`)."""
    if value is None:
        return None
    from nofree.core import SpecError
    from nofree.scoring import normalize_scorer_spec

    try:
        return normalize_scorer_spec(value)
    except SpecError as err:
        from nofree.cli_output import OneLineError

        raise OneLineError(f"--scorer: {err}") from err


def scorer_option(help: str):
    """``--scorer SPEC`` (parameter ``scorer``): MAGIC's image–text scorer."""
    return click.option("--scorer", metavar="SPEC", default=None, callback=_parse_scorer, help=help)


def _parse_windows(ctx, param, value):
    """``"0:4,1:4"`` -> ``[(0, 4), (1, 4)]``."""
    if value is None:
        return None
    try:
        windows = [tuple(int(x) for x in part.split(":")) for part in value.split(",") if part.strip()]
    except ValueError:
        windows = []
    if not windows or any(len(w) != 2 or w[0] < 0 or w[1] < 0 for w in windows):
        raise click.BadParameter(f"{value!r}: give FIRST:COUNT pairs separated by commas, e.g. 0:4,1:4")
    return windows


def windows_option(f):
    """``--windows FIRST:COUNT,...`` (parameter ``windows``): the example windows of MAGIC's drafts."""
    return click.option("--windows", callback=_parse_windows, default=None,
                        help="MAGIC: the drafts' example windows FIRST:COUNT over the photo's ranked pool "
                             "captions, comma-separated (overrides --drafts), e.g. 0:4,1:4.")(f)


def candidate_options(f):
    """``--drafts``, ``--consensus`` and ``--with-retrieved/--no-retrieved`` (parameters ``drafts``,
    ``consensus``, ``with_retrieved``) of ``caption`` and ``eval``: the candidates of MAGIC and
    SmallCap-style, one kept by CIDEr-D consensus with the photo's retrieved captions."""
    options = (
        click.option("--drafts", type=click.IntRange(min=1), default=None,
                     help="MAGIC and smallcap: captions written per photo, each with another window of pool "
                          "examples; the one agreeing most with the retrieved captions is kept (default: "
                          "MAGIC 8, smallcap 2; 1: a single draft)."),
        click.option("--consensus", type=click.IntRange(min=1), default=None,
                     help="MAGIC and smallcap: retrieved captions used as pseudo-references to choose among "
                          "candidates (CIDEr-D; default 20)."),
        click.option("--with-retrieved/--no-retrieved", default=None,
                     help="MAGIC and smallcap: also offer the caption that --method retrieval returns as a "
                          "candidate (default: MAGIC no, smallcap yes, as cross-validation chose)."))
    for option in reversed(options):
        f = option(f)
    return f
