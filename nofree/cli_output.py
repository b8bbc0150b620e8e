"""How the command line hands out results: streamed as they finish, and kept when interrupted.

``stream_rows`` writes each JSONL row the moment the library yields it (flushed), so a pipe or
a file holds every finished row whatever stops the run; a table is aligned, so its rows are
printed together at the end, and also when an error or an interrupt stops the run early.
``signals_as_exceptions`` makes SIGTERM raise :class:`Terminated` (a ``KeyboardInterrupt``) as
Ctrl-C does, so ``finally`` blocks run for both: the library flushes its caches and the CLI
prints a one-line message instead of a traceback (exit code 128 + the signal number). Errors a
user can fix are one line too (:class:`OneLineError`), with the library's parameter names
written as the flags that set them (:func:`cli_message`).
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import closing, contextmanager, nullcontext
from typing import Callable, Iterable, Iterator

import click


class OneLineError(click.ClickException):
    """An error a user can fix, printed as one line (``Error: ...``) with exit code 2."""

    exit_code = 2


#: Library parameters whose flag is not ``--`` and their name with dashes (``no_repeat_ngram``:
#: ``--no-repeat-ngram``).
_FLAGS = {"anchor_dir": "--anchors", "adapter_dir": "--adapter", "max_new_tokens": "--max-tokens",
          "out_dir": "--report"}


def cli_message(err: Exception) -> str:
    """An error's message for the command line: the parameters a library
    :class:`~nofree.core.OptionError` names written as the flags that set them."""
    from nofree.core import OptionError

    if not isinstance(err, OptionError):
        return str(err)

    def flag(option) -> str:
        name = _FLAGS.get(option.name, "--" + option.name.replace("_", "-"))
        value = option.placeholder if option.value is None else option.value
        return name if value == "" or value is True else f"{name} {value}"  # True: a switch

    return err.worded(flag)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated`; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may
        yield
        return

    def _raise(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_exit(err: KeyboardInterrupt) -> click.exceptions.Exit:
    """The one line on stderr and the exit (130 for Ctrl-C, 143 for SIGTERM) of an interrupted run."""
    name, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("Ctrl-C (SIGINT)", 130)
    click.echo(f"nofree: interrupted by {name}; every result finished before it was written", err=True)
    return click.exceptions.Exit(code)


def stream_rows(rows: Iterable[dict], fmt: str, columns: list[str],
                table_row: Callable[[dict], dict] | None = None) -> None:
    """Write ``rows`` to stdout: ``jsonl``, one JSON line per row as each arrives (flushed);
    ``json``, one JSON list of every row (error rows included) at the end; ``table``,
    ``table_row(row)`` for each row without an ``error``, aligned in ``columns``. ``json`` and
    ``table`` print after the last row, or after whatever stopped the iteration. The iterator is
    closed on the way out, so a generator's own cleanup runs before the exception travels on."""
    finished: list[dict] = []
    iterator = iter(rows)
    try:
        with closing(iterator) if hasattr(iterator, "close") else nullcontext():
            for row in iterator:
                if fmt == "jsonl":
                    click.echo(json.dumps(row, ensure_ascii=False))
                    sys.stdout.flush()
                elif fmt == "json":
                    finished.append(row)
                elif "error" not in row:  # unreadable inputs are reported on stderr instead
                    finished.append(table_row(row) if table_row else row)
    except BaseException:
        if fmt != "jsonl" and finished:  # the rows finished before the run was stopped
            _print_rows(finished, fmt, columns)
        raise
    if fmt != "jsonl":
        _print_rows(finished, fmt, columns)


def _print_rows(rows: list[dict], fmt: str, columns: list[str]) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        print_table(rows, columns)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Rows as an aligned text table on stdout (a header line, then one line per row)."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
