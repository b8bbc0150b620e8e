"""Read webdataset tar shards (as img2dataset writes them) into (image, captions) pairs.

A webdataset source names its shards as webdataset and img2dataset users write them: one shard,
a folder of shards, a brace pattern (``shards/{00000..00099}.tar``, expanded with
``braceexpand`` as webdataset does), several of these joined by ``::``, or (in Python) a list of
them. Shards are ``.tar`` or gzip-compressed ``.tar.gz`` / ``.tgz``. Inside a shard, the files of
one sample are consecutive members sharing a *key*: the member path up to the first dot of its
file name (``00000/000000012.jpg``, ``.txt``, ``.json`` -> key ``00000/000000012``). A sample
becomes one :class:`~nofree.core.Pair`:

* its image is the member with an image suffix (``.jpg``, ``.png``, ``.webp``, ...);
* its caption is the ``.txt`` member (whitespace runs become one space), else the ``"caption"``
  (or ``"captions"`` list) field of the ``.json`` member;
* ``Pair.image`` is a *member reference* ``/abs/path/00000.tar#00000/000000012.jpg``, which
  :func:`nofree.data.images.load_image` reads with one seek (image bytes are never held for the
  whole dataset); ``Pair.meta`` holds ``key`` and ``shard``. In a ``.tar.gz`` shard the offsets
  are those of the decompressed stream: one open decompressor per shard moves forward from
  member to member, so reading a shard's members in order decompresses it once (a backward
  jump, e.g. a resumed build, starts again from the top of that shard).

Bad input never stops a read: a sample without a caption, without an image member (e.g. only a
``.json`` of a failed download, or a stray non-image file), or with a member cut off by a
truncated tar is skipped and reported (:class:`WebScan.skipped`, and a log warning); a truncated
shard keeps the samples before the cut. Tar reading uses the standard library (``tarfile``,
``gzip``); nothing in a shard is executed or unpickled.
"""
from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from nofree.core import DataError, Pair
from nofree.data.images import REF_SEPS  # separate a shard path from a member name

log = logging.getLogger(__name__)

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
_CAPTION_LIMIT = 1 << 20  # a caption member above 1 MiB is not a caption
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class WebScan:
    """What :func:`scan_webdataset` found: the pairs, and ``(ref, reason)`` for each skipped sample."""

    pairs: list[Pair] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)


def _is_shard_name(path: Path) -> bool:
    return path.name.lower().endswith(SHARD_SUFFIXES)


def is_shard_pattern(source: object) -> bool:
    """True for what names shards without being one path: a list or tuple of paths, or a string
    that is not an existing path and holds a brace pattern or ``::``."""
    if isinstance(source, (list, tuple)):
        return bool(source) and all(isinstance(item, (str, os.PathLike)) for item in source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    return isinstance(source, str) and ("{" in source or "::" in source) and \
        not os.path.exists(os.path.expanduser(source))


def _expand(source: str | os.PathLike | list | tuple) -> list[str]:
    """The paths a source names: ``::``-joined parts and list items, each brace-expanded."""
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    paths = []
    for item in items:
        text = os.fspath(item)
        if os.path.exists(os.path.expanduser(text)):  # a real name with braces stays as it is
            paths.append(text)
            continue
        for part in (p for p in text.split("::") if p.strip()):
            from braceexpand import braceexpand

            try:
                paths += list(braceexpand(part.strip()))
            except Exception as err:  # braceexpand raises its own error types on bad patterns
                raise DataError(f"shard pattern {part!r} cannot be expanded ({err}); write it like "
                                "'shards/{00000..00099}.tar'") from None
    return paths


def is_webdataset(source: str | os.PathLike | list | tuple) -> bool:
    """True for a shard (``.tar``, ``.tar.gz``, ``.tgz``), a folder holding shards
    (img2dataset's output folder), or a shard pattern or list naming shards."""
    if is_shard_pattern(source):
        return all(_is_shard_name(Path(p)) or Path(p).is_dir() for p in _expand(source))
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.is_file():
        return _is_shard_name(path)
    return path.is_dir() and any(_is_shard_name(p) for p in path.iterdir())


def find_shards(source: str | os.PathLike | list | tuple) -> list[Path]:
    """The shards ``source`` names (see the module docstring): a folder's sorted by name, a
    pattern's or list's in the order written."""
    shards: list[Path] = []
    pattern = is_shard_pattern(source)
    for text in _expand(source) if pattern else [os.fspath(source)]:
        path = Path(os.path.expanduser(text)).absolute()
        if path.is_file():
            shards.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_shard_name(p) and p.is_file())
            if not found:
                raise DataError(f"{path} holds no .tar shards; write them with img2dataset "
                                "(--output_format webdataset) or pass a pairs .jsonl/.csv file")
            shards += found
        elif pattern:
            raise DataError(f"shard {path} (from {source!r}) does not exist; check the pattern's "
                            "range, e.g. 'shards/{00000..00099}.tar'")
        else:
            raise DataError(f"webdataset source {path} does not exist: pass a .tar shard, a folder "
                            "of them or a pattern like 'shards/{00000..00099}.tar'")
    for shard in shards:
        if not shard.name.endswith(SHARD_SUFFIXES):
            raise DataError(f"{shard}: name webdataset shards *.tar or *.tar.gz (lower case), "
                            "e.g. 00000.tar")
    return shards


def _compressed(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz"))


def split_key(name: str) -> tuple[str, str]:
    """webdataset's key and suffix of a member name: ``a/b/000012.seg.png`` -> (``a/b/000012``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def _open(path: Path, cut: list[tuple[str, str | None]]) -> tarfile.TarFile | None:
    try:
        return tarfile.open(path, mode="r:gz" if _compressed(path) else "r:")
    except (tarfile.TarError, OSError, EOFError) as err:
        cut.append((f"not a readable tar shard ({err})", None))
        return None


def _members(tar: tarfile.TarFile, path: Path, cut: list[tuple[str, str | None]]) -> Iterator[tarfile.TarInfo]:
    """Regular-file members of the open shard ``tar`` in order, each whole on disk.

    A shard that ends early (a member's data past the end of the file, a broken header, or no
    end-of-archive blocks after the last member) stops the iteration and appends ``(why, name
    of the member cut off or None)`` to ``cut``. In a compressed shard the decompressed size is
    unknown: a cut shows as a read error at the next header.
    """
    size = float("inf") if _compressed(path) else path.stat().st_size
    end = 0  # end of the last member's data, rounded up to whole 512-byte blocks
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, OSError, EOFError) as err:
            cut.append((f"corrupt tar header after byte {end} ({err})", None))
            return
        if info is None:
            break
        if info.offset_data + info.size > size:
            cut.append((f"truncated tar: member {info.name} is cut off", info.name))
            return
        end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if info.isfile():
            yield info
    if end and size - end < 2 * tarfile.BLOCKSIZE and not _compressed(path):
        cut.append(("truncated tar: no end-of-archive blocks after the last member", None))


def _caption_of(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo],
                read_ahead: dict[str, bytes]) -> tuple[str, ...]:
    """The sample's captions from its ``.txt`` or ``.json`` member (empty tuple if none);
    ``read_ahead`` holds member bytes already read (compressed shards)."""
    def read(info: tarfile.TarInfo) -> str:
        if info.size > _CAPTION_LIMIT:
            return ""
        if info.name in read_ahead:
            return read_ahead[info.name].decode("utf-8", errors="replace")
        handle = tar.extractfile(info)
        return handle.read().decode("utf-8", errors="replace") if handle else ""

    if "txt" in members:
        text = " ".join(read(members["txt"]).split())
        return (text,) if text else ()
    if "json" in members:
        try:
            row = json.loads(read(members["json"]))
        except json.JSONDecodeError:
            return ()
        raw = row.get("captions", row.get("caption")) if isinstance(row, dict) else None
        raw = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        return tuple(c for c in (" ".join(str(x).split()) for x in raw if isinstance(x, str)) if c)
    return ()


def scan_shard(path: Path, *, limit: int | None = None) -> WebScan:
    """The pairs of one shard (reading only headers and caption members), and what was skipped.

    A truncated shard keeps every sample before the cut; the sample the cut falls in is reported
    as skipped (its other members may be lost), as is the cut itself.
    """
    scan = WebScan(shards=[path])
    cut: list[tuple[str, str | None]] = []
    # compressed shards: read caption members on the way (going back would decompress again)
    read_ahead: dict[str, bytes] = {}
    compressed = _compressed(path)
    tar = _open(path, cut)
    if tar is None:
        scan.skipped.append((str(path), cut[0][0]))
        return scan

    def close(key: str, members: dict[str, tarfile.TarInfo]) -> None:
        image = next((members[ext] for ext in _IMAGE_EXTS if ext in members), None)
        if image is None:
            scan.skipped.append((f"{path}#{key}", "no image member (has ." + ", .".join(sorted(members)) + ")"))
            return
        captions = _caption_of(tar, members, read_ahead)
        if not captions:
            scan.skipped.append((f"{path}#{image.name}", "no caption (.txt, or \"caption\" in .json)"))
            return
        scan.pairs.append(Pair(f"{path}#{image.name}", captions, None, {"key": key, "shard": path.name}))

    with tar:
        current: tuple[str, dict[str, tarfile.TarInfo]] | None = None
        for info in _members(tar, path, cut):
            key, suffix = split_key(info.name)
            if current is None or current[0] != key:
                if current is not None:
                    close(*current)
                if limit is not None and len(scan.pairs) >= limit:
                    return scan
                current = (key, {})
                read_ahead.clear()
            current[1][suffix] = info
            if compressed and suffix in ("txt", "json") and info.size <= _CAPTION_LIMIT:
                try:
                    handle = tar.extractfile(info)
                    read_ahead[info.name] = handle.read() if handle else b""
                except (tarfile.TarError, OSError, EOFError) as err:
                    cut.append((f"corrupt compressed data in {info.name} ({err})", info.name))
                    break
        # the last sample is whole unless the shard ends early inside it (a cut member of another
        # key starts a new sample, so the one before it is complete)
        whole = not cut or (cut[0][1] is not None and split_key(cut[0][1])[0] != (current or ("",))[0])
        if current is not None and (limit is None or len(scan.pairs) < limit):
            if whole:
                close(*current)
            else:
                scan.skipped.append((f"{path}#{current[0]}", "sample cut off by a truncated tar"))
        if cut:
            if cut[0][1] is not None and whole:
                scan.skipped.append((f"{path}#{split_key(cut[0][1])[0]}", "sample cut off by a truncated tar"))
            scan.skipped.append((str(path), cut[0][0]))
    return scan


def scan_webdataset(source: str | os.PathLike, *, limit: int | None = None) -> WebScan:
    """Pairs of every shard of ``source`` in shard order, with the skipped samples (logged)."""
    total = WebScan()
    for shard in find_shards(source):
        left = None if limit is None else limit - len(total.pairs)
        if left is not None and left <= 0:
            break
        part = scan_shard(shard, limit=left)
        total.pairs += part.pairs
        total.skipped += part.skipped
        total.shards.append(shard)
    if total.skipped:
        shown = "; ".join(f"{ref}: {why}" for ref, why in total.skipped[:3])
        log.warning("webdataset %s: skipped %d sample(s) or shard part(s): %s%s", source,
                    len(total.skipped), shown, " ..." if len(total.skipped) > 3 else "")
    return total


# --- reading one member by reference --------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _member_offsets(path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """``member name -> (data offset, size)`` of a shard (headers only; cached per file version)."""
    cut: list[tuple[str, str | None]] = []
    tar = _open(Path(path), cut)
    if tar is None:
        return {}
    with tar:
        return {info.name: (info.offset_data, info.size) for info in _members(tar, Path(path), cut)}


def split_ref(ref: str) -> tuple[str, str]:
    """``(shard path, member name)`` of a member reference ``SHARD.tar[.gz]#MEMBER``."""
    cuts = [(ref.find(sep), sep) for sep in REF_SEPS if sep in ref]
    at, sep = min(cuts)
    return ref[:at + len(sep) - 1], ref[at + len(sep):]


#: one open decompressor per compressed shard (the last few used), each behind its lock
_GZ_READERS: dict[str, tuple[threading.Lock, gzip.GzipFile]] = {}
_GZ_LOCK = threading.Lock()
_GZ_OPEN = 4


def _read_compressed(shard: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of the decompressed stream of ``shard``."""
    with _GZ_LOCK:
        entry = _GZ_READERS.pop(shard, None)
        if entry is None:
            entry = (threading.Lock(), gzip.open(shard, "rb"))
        _GZ_READERS[shard] = entry  # most recently used last
        while len(_GZ_READERS) > _GZ_OPEN:
            old_lock, old = _GZ_READERS.pop(next(iter(_GZ_READERS)))
            with old_lock:
                old.close()
    lock, handle = entry
    with lock:
        if handle.closed:  # closed by another thread's eviction meanwhile
            handle = gzip.open(shard, "rb")
        handle.seek(offset)  # forward: decompress and skip; backward: from the top again
        return handle.read(size)


def read_member(ref: str) -> bytes:
    """The bytes of member reference ``SHARD.tar#MEMBER`` (DataError naming it when absent)."""
    shard, member = split_ref(ref)
    try:
        stat = os.stat(shard)
    except OSError as err:
        raise DataError(f"image {ref}: shard {shard} cannot be read ({err.strerror}); check the "
                        "webdataset path") from None
    where = _member_offsets(shard, stat.st_mtime_ns, stat.st_size).get(member)
    if where is None:
        raise DataError(f"image {ref}: no member {member!r} in {shard} (truncated or rewritten shard?)")
    offset, size = where
    if _compressed(Path(shard)):
        try:
            data = _read_compressed(shard, offset, size)
        except (OSError, EOFError) as err:
            raise DataError(f"image {ref}: the compressed shard cannot be read ({err})") from None
    else:
        with open(shard, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
    if len(data) != size:
        raise DataError(f"image {ref} is cut off: the shard is truncated")
    return data
