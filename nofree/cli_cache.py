"""``nofree cache info|clear``: what the embedding cache holds, and emptying it safely.

The cache lives in ``$NOFREE_CACHE`` (default ``~/.cache/nofree``; see :mod:`nofree.cache`):
``embeddings/<spec folder>/`` per encoder spec (``spec.json`` + safetensors shards) and
``native/`` (compiled kernels, rebuilt in about a second when missing). ``info`` only reads
shard headers; ``clear`` deletes spec folders that nofree wrote (they hold ``spec.json``) under
``embeddings/`` and nothing else (``--stale``: only those of ``local:`` models whose folder is
gone).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click

from nofree.cli_options import format_option


def _size(path: Path) -> int:
    """Bytes of the files under ``path`` (symbolic links not followed)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _entries(folder: Path, kind: str) -> int:
    """Distinct items in the ``kind`` shards of one spec folder (from the shard headers)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for shard in folder.glob(f"{kind}-*.safetensors"):
        try:
            with safe_open(str(shard), framework="pt") as handle:
                keys.update(json.loads((handle.metadata() or {}).get("keys", "[]")))
        except Exception:  # a corrupt shard is set aside when the cache next reads it
            continue
    return len(keys)


def spec_folders(root: Path) -> list[tuple[str, Path]]:
    """``(spec, folder)`` of every spec folder nofree wrote under ``root/embeddings``."""
    found = []
    base = root / "embeddings"
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        marker = folder / "spec.json"
        if folder.is_dir() and not folder.is_symlink() and marker.is_file():
            try:
                found.append((str(json.loads(marker.read_text(encoding="utf-8"))["spec"]), folder))
            except (OSError, ValueError, KeyError, TypeError):
                found.append((f"<unreadable spec.json in {folder.name}>", folder))
    return found


def cache_summary(root: Path) -> dict:
    """Path, total size and, per encoder spec, its embedding and token-grid entries and size."""
    specs = [{"spec": spec, "embeddings": _entries(folder, "embed"), "token_grids": _entries(folder, "tokens"),
              "bytes": _size(folder), "folder": str(folder)} for spec, folder in spec_folders(root)]
    native = root / "native"
    return {"path": str(root), "bytes": _size(root) if root.is_dir() else 0, "specs": specs,
            "native_bytes": _size(native) if native.is_dir() else 0}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@click.group()
def cache() -> None:
    """Inspect or empty the embedding cache ($NOFREE_CACHE, default ~/.cache/nofree)."""


@cache.command("info")
@format_option()
def cache_info(fmt: str) -> None:
    """Show the cache folder, its size and the entries kept per encoder spec."""
    from nofree.cache import default_cache_root

    summary = cache_summary(default_cache_root())
    if fmt == "json":
        click.echo(json.dumps(summary, indent=2))
        return
    if fmt == "jsonl":
        for row in summary["specs"]:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    from nofree.cli_output import print_table

    click.echo(f"cache        {summary['path']}  ({_mib(summary['bytes'])}; compiled kernels "
               f"{_mib(summary['native_bytes'])})")
    rows = [{**row, "size": _mib(row["bytes"])} for row in summary["specs"]]
    if rows:
        print_table(rows, ["spec", "embeddings", "token_grids", "size"])
    else:
        click.echo("no cached embeddings")


def _matching(spec: str, known: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The cached specs ``spec`` names: exactly, or as the registry normalises it."""
    names = {spec.strip()}
    from nofree.core import SpecError
    from nofree.registry import normalize_spec

    for role in (None, "image", "text"):
        try:
            names.add(normalize_spec(spec, role))
        except SpecError:
            pass
    return [(s, folder) for s, folder in known if s in names]


def stale_local(spec: str) -> bool:
    """Whether ``spec`` names a ``local:`` model folder (a ``#view`` suffix aside) that no longer
    exists, so its cached embeddings can never be read again."""
    if not spec.startswith("local:"):
        return False
    return not Path(spec.removeprefix("local:").split("#", 1)[0]).is_dir()


@cache.command("clear")
@click.option("--spec", help="Delete only this encoder's entries (as `nofree cache info` lists it); "
              "default: every spec's.")
@click.option("--stale", is_flag=True, help="Delete only the entries of local:DIR models whose folder "
              "no longer exists (e.g. models built in temporary folders).")
@click.option("--yes", is_flag=True, help="Delete without asking. Without it nofree asks on a "
              "terminal and refuses (deleting nothing) when stdin is not one, e.g. in a script.")
def cache_clear(spec: str | None, stale: bool, yes: bool) -> None:
    """Delete cached embeddings. Only spec folders nofree wrote (holding spec.json) under the
    cache's embeddings/ folder are removed; compiled kernels and anything else stay."""
    from nofree.cache import default_cache_root

    if spec and stale:
        raise click.UsageError("--spec and --stale exclude each other: give one")
    root = default_cache_root()
    known = spec_folders(root)
    targets = _matching(spec, known) if spec else known
    if stale:
        targets = [(s, folder) for s, folder in targets if stale_local(s)]
    if spec and not targets:
        listed = ", ".join(s for s, _ in known) or "none"
        raise click.ClickException(f"--spec {spec!r}: no cached entries for it in {root} (cached specs: "
                                   f"{listed})")
    if not targets:
        click.echo(f"nothing to delete: no cached embeddings of a local: model whose folder is gone in {root}"
                   if stale else f"nothing to delete: no cached embeddings in {root}")
        return
    base = (root / "embeddings").resolve()
    for _, folder in targets:  # spec folders are made by nofree; refuse anything that points out
        if folder.resolve().parent != base:
            raise click.ClickException(f"{folder} does not resolve inside {base}; not deleting it")
    total = sum(_size(folder) for _, folder in targets)
    what = f"{len(targets)} spec folder(s), {_mib(total)} under {root / 'embeddings'}"
    if not yes:
        if not sys.stdin.isatty():
            error = click.ClickException(f"would delete {what}; pass --yes to delete without asking "
                                         "(stdin is not a terminal)")
            error.exit_code = 2
            raise error
        click.echo("\n".join(f"  {s}" for s, _ in targets))
        if not click.confirm(f"delete {what}?", default=False):
            click.echo("nothing deleted")
            return
    for _, folder in targets:
        shutil.rmtree(folder)
    click.echo(f"deleted {what}")
