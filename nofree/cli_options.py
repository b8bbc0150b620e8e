"""Option pieces several nofree commands share: the pairs-source type and the output format."""
from __future__ import annotations

import os
from pathlib import Path

import click

#: ``--format`` choices of every command that prints results
FORMATS = ("table", "jsonl", "json")
#: older spellings still accepted (``text`` was ``anchors info``'s name for ``table``)
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
