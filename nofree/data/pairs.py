"""Read (image, captions) pairs from JSONL, CSV, a folder of images with caption sidecars, or
webdataset tar shards.

Four layouts, told apart by the source itself:

* ``*.jsonl``: one JSON object a line, ``{"image": "images/1.jpg", "captions": [...],
  "split": "train", ...}``; a single ``"caption": "..."`` string is accepted too. Other fields
  (``coco_id``, ``categories``, ...) are kept in ``Pair.meta``.
* ``*.csv``: a header naming ``image`` and ``caption`` (and optionally ``split``); rows that
  share an image become one pair with several captions, in file order; further columns of an
  image's first row go to ``Pair.meta``.
* a directory: every image file ``foo.jpg`` (any depth) with a sidecar ``foo.txt`` holding one
  caption per non-empty line.
* a ``.tar`` / ``.tar.gz`` file, a directory holding such files, a brace pattern
  (``shards/{00000..00099}.tar``), several of these joined by ``::``, or a list of them:
  webdataset shards as img2dataset writes them (``KEY.jpg`` + ``KEY.txt`` / ``KEY.json`` per
  sample); see :mod:`nofree.data.webdataset`.
  Image paths are then member references ``SHARD.tar#MEMBER``; samples without a caption or
  image, and truncated shards, are skipped and logged.

Relative image paths are resolved against the folder of the pairs file and stored as absolute
path strings. Captions are stripped and runs of whitespace (line breaks, tabs) become one
space.

Memory stays bounded whatever a row holds: files are read line by line, a line longer than
``MAX_LINE_BYTES`` is a ``DataError``, and a caption longer than ``MAX_CAPTION_CHARS`` is cut to
that length (one warning per file with the count). Text files must be UTF-8 (a byte-order mark
is allowed); other bytes are a ``DataError`` naming the line.

Whether the image file exists is not checked here: unreadable images are skipped and reported
where images are read (``nofree.data.images``). Any malformed row is a ``DataError`` naming the
file, the line and what to fix.
"""
from __future__ import annotations

import codecs
import csv
import json
import logging
import os
from pathlib import Path
from typing import Collection, Iterator, Sequence

from nofree.core import DataError, Pair

log = logging.getLogger(__name__)

#: File suffixes (lower case) treated as images when reading an image folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_JSONL_RESERVED = ("image", "captions", "caption", "split")

#: The longest line (bytes) a pairs, labels or caption-pool file may hold: room for a row with
#: several captions of ``MAX_CAPTION_CHARS`` each, while reading one line stays a few tens of MB.
MAX_LINE_BYTES = 16 * 2**20

#: Captions are cut to this many characters when read: 2048 tokens at ``nofree.core``'s
#: ``CHARS_PER_TOKEN``, four times the longest input of any text encoder nofree ships (512).
MAX_CAPTION_CHARS = 2**16


def load_pairs(source: str | os.PathLike | Sequence[str | os.PathLike], *, split: str | None = None,
               limit: int | None = None) -> list[Pair]:
    """All pairs of ``source`` (a ``.jsonl`` / ``.csv`` file, an image folder, or webdataset
    shards: one, a folder, a brace pattern or a list), in file order.

    ``split`` keeps only pairs whose ``split`` field equals it (``None`` keeps all); ``limit``
    keeps the first ``limit`` pairs after that filter. Raises ``DataError`` for a missing or
    malformed source, or when no pair is left.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit={limit!r}: expected a positive whole number of pairs (or None for all)")
    from nofree.data.webdataset import is_shard_pattern, is_webdataset, scan_webdataset

    shards = is_shard_pattern(source)
    path = Path(os.path.expanduser("::".join(map(os.fspath, source)) if isinstance(source, (list, tuple))
                                   else os.fspath(source)))
    if not shards and not path.exists():
        raise DataError(f"pairs source {path} does not exist: pass a .jsonl or .csv pairs file or a "
                        "folder of images with .txt caption sidecars, or webdataset shards (a .tar, a "
                        "folder of them or a pattern like 'shards/{00000..00099}.tar')")
    if shards:
        pairs = scan_webdataset(source, limit=limit if split is None else None).pairs
    elif is_webdataset(path):
        pairs = scan_webdataset(path, limit=limit if split is None else None).pairs
    elif path.is_dir():
        pairs = _read_folder(path)
    elif path.suffix.lower() == ".jsonl":
        pairs = _read_jsonl(path)
    elif path.suffix.lower() == ".csv":
        pairs = _read_csv(path)
    else:
        raise DataError(f"{path}: unknown pairs format {path.suffix!r}; use a .jsonl file (one "
                        "{\"image\": ..., \"captions\": [...]} object a line), a .csv file with an "
                        "'image,caption' header, a folder of images with .txt sidecars, or "
                        "webdataset .tar shards")
    if not pairs:
        raise DataError(f"{path} holds no pairs: add at least one image with a caption")
    if split is not None:
        selected = [pair for pair in pairs if pair.split == split]
        if not selected:
            present = sorted({str(pair.split) for pair in pairs})
            raise DataError(f"{path} has no pairs with split={split!r}; the splits present are "
                            f"{', '.join(present)} (None means the rows carry no split)")
        pairs = selected
    return pairs[:limit] if limit is not None else pairs


def dedupe_pairs(pairs: Sequence[Pair], source: object, *, dedupe: bool,
                 existing: Collection[tuple[str, str]] = frozenset()) -> list[Pair]:
    """Report repeated pairs (one warning with the counts) and, when ``dedupe``, skip them.

    Two kinds are counted, in order: a pair listing an image (of the same split) that an earlier
    pair already listed, and a caption its image already has. Skipping merges a repeated image's
    new captions into its first pair and drops repeated captions, so every (image, caption)
    anchor is encoded once; without ``dedupe`` the pairs come back unchanged. ``existing``: the
    (image, caption) anchors a set already holds (when extending it); a pair's caption among them
    counts as a repeated caption too.
    """
    first: dict[tuple[str, str | None], int] = {}  # (image, split) -> index in `kept`
    kept: list[Pair] = []
    repeated_images = repeated_captions = 0
    for pair in pairs:
        key = (pair.image, pair.split)
        if key in first:
            repeated_images += 1
            known = kept[first[key]]
        else:
            known = None
        have = set(known.captions) if known is not None else set()
        new = []
        for caption in pair.captions:
            if caption in have or (pair.image, caption) in existing:
                repeated_captions += 1
            else:
                have.add(caption)
                new.append(caption)
        if known is None:
            if pair.captions and not new:  # every caption is among the ``existing`` anchors
                continue
            first[key] = len(kept)
            kept.append(Pair(pair.image, tuple(new), pair.split, pair.meta) if new else pair)
        elif new:
            kept[first[key]] = Pair(known.image, known.captions + tuple(new), known.split, known.meta)
    if not (repeated_images or repeated_captions):
        return list(pairs)
    log.warning("%s: %d pair(s) list an image listed before and %d caption(s) repeat one their image "
                "already has; %s", source, repeated_images, repeated_captions,
                "skipped them (dedupe=True, --dedupe)" if dedupe else "each repeat becomes another "
                "anchor (dedupe=True, --dedupe, skips them)")
    return kept if dedupe else list(pairs)


def load_text_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file (e.g. a caption pool), stripped, in order."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise DataError(f"text file {path} does not exist: pass a UTF-8 file with one caption a line")
    return [line.strip() for _, line in read_lines(path) if line.strip()]


def load_labels(path: str | os.PathLike) -> list[str]:
    """Class labels from a UTF-8 file: one label a line, or a JSON list of strings."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist: pass a UTF-8 file with one label a line")
    lines = list(read_lines(path))
    text = "".join(line for _, line in lines).strip()
    if not text.startswith("["):
        return [line.strip() for _, line in lines if line.strip()]
    if sum(len(line) for _, line in lines) > MAX_LINE_BYTES:
        raise DataError(f"{path}: a JSON list of labels longer than {MAX_LINE_BYTES >> 20} MiB; "
                        "give one label a line instead")
    try:
        labels = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: invalid JSON ({err.msg}); give a JSON list of "
                        "strings like [\"cat\", \"dog\"], or one label a line") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise DataError(f"{path}: expected a JSON list of non-empty strings like [\"cat\", \"dog\"]")
    return [label.strip() for label in labels]


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a UTF-8 file, line ending kept, BOM dropped.

    Reads one line at a time, at most ``MAX_LINE_BYTES`` of it. Raises ``DataError`` naming the
    line for bytes that are not UTF-8 or a line longer than the bound.
    """
    with open(path, "rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}, line {number}: longer than {MAX_LINE_BYTES >> 20} MiB; "
                                f"nofree keeps at most {MAX_CAPTION_CHARS} characters of a caption, "
                                "so shorten that line's text (is the file missing line breaks?)")
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}, line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} "
                                f"at column {err.start + 1}); re-save the file as UTF-8") from None
            yield number, text


def _warn_cut(path: Path, cut: list[str]) -> None:
    """One warning for the captions of ``path`` cut to ``MAX_CAPTION_CHARS``."""
    if cut:
        log.warning("%s: %d caption(s) longer than %d characters were cut to that length "
                    "(first at %s)", path, len(cut), MAX_CAPTION_CHARS, cut[0])


# --- layouts ---

def _resolve(image: str, base: Path) -> str:
    """``image`` as an absolute path string; relative paths are taken from ``base``."""
    image_path = Path(os.path.expanduser(image))
    if not image_path.is_absolute():
        image_path = base / image_path
    return os.path.normpath(os.path.abspath(image_path))


def _clean_captions(raw: object, where: str, cut: list[str]) -> tuple[str, ...]:
    """Validated, stripped captions; ``where`` ("FILE, line N") prefixes every error and is
    appended to ``cut`` for each caption cut to ``MAX_CAPTION_CHARS``."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DataError(f"{where}: no captions; give \"captions\": [\"...\"] (a non-empty list of "
                        "strings) or \"caption\": \"...\"")
    captions = []
    for i, caption in enumerate(raw):
        if not isinstance(caption, str):
            raise DataError(f"{where}: caption {i} is {type(caption).__name__} {caption!r}, "
                            "expected a string")
        if not caption.strip():
            raise DataError(f"{where}: caption {i} is empty; remove it or write the caption")
        if len(caption) > MAX_CAPTION_CHARS:
            caption = caption[:MAX_CAPTION_CHARS]
            cut.append(where)
        captions.append(" ".join(caption.split()))
    return tuple(captions)


def _read_jsonl(path: Path) -> list[Pair]:
    base = path.parent
    pairs, cut = [], []
    for number, line in read_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); each line "
                            "must be one JSON object like {\"image\": \"a.jpg\", \"captions\": "
                            "[\"...\"]}") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: missing \"image\" field (a path to the image file, "
                            "relative to the pairs file's folder or absolute)")
        if "captions" in row and "caption" in row:
            raise DataError(f"{where}: has both \"captions\" and \"caption\"; keep one")
        captions = _clean_captions(row.get("captions", row.get("caption")), where, cut)
        split = row.get("split")
        if split is not None and not isinstance(split, str):
            raise DataError(f"{where}: \"split\" must be a string such as \"train\", got {split!r}")
        meta = {key: value for key, value in row.items() if key not in _JSONL_RESERVED}
        pairs.append(Pair(_resolve(image.strip(), base), captions, split, meta))
    _warn_cut(path, cut)
    return pairs


def _read_csv(path: Path) -> list[Pair]:
    base = path.parent
    rows: dict[str, dict] = {}  # image as written -> {"captions", "split", "meta", "line"}
    cut: list[str] = []
    # a quoted field may span lines; csv's own field bound (128 KiB) becomes the line bound
    previous_limit = csv.field_size_limit(MAX_LINE_BYTES)
    try:
        reader = csv.reader(line for _, line in read_lines(path))
        try:
            header = next(reader)
        except StopIteration:
            return []
        except csv.Error as err:
            raise DataError(f"{path}, line 1: unreadable CSV header ({err})") from None
        names = [name.strip() for name in header]
        if "image" not in names or "caption" not in names:
            raise DataError(f"{path}, line 1: the header must name the columns 'image' and "
                            f"'caption' (optionally 'split'); found {names}")
        if len(set(names)) != len(names):
            raise DataError(f"{path}, line 1: repeated column names in the header {names}")
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({err}); check "
                                "the quoting of that row") from None
            number = reader.line_num
            where = f"{path}, line {number}"
            if not any(value.strip() for value in values):
                continue
            if len(values) != len(names):
                raise DataError(f"{where}: {len(values)} fields but the header has {len(names)}; "
                                "quote captions that contain commas")
            row = dict(zip(names, values))
            image = row["image"].strip()
            if not image:
                raise DataError(f"{where}: empty 'image' field; give the image path")
            caption = _clean_captions(row["caption"], where, cut)[0]
            split = row.get("split", "").strip() or None
            entry = rows.get(image)
            if entry is None:
                meta = {k: v for k, v in row.items() if k not in ("image", "caption", "split")}
                rows[image] = {"captions": [caption], "split": split, "meta": meta, "line": number}
            else:
                if entry["split"] != split:
                    raise DataError(f"{where}: image {image!r} has split {split!r} here but "
                                    f"{entry['split']!r} on line {entry['line']}; one image belongs "
                                    "to one split")
                entry["captions"].append(caption)
    finally:
        csv.field_size_limit(previous_limit)
    _warn_cut(path, cut)
    return [Pair(_resolve(image, base), tuple(entry["captions"]), entry["split"], entry["meta"])
            for image, entry in rows.items()]


def _read_folder(folder: Path) -> list[Pair]:
    images = sorted((p for p in folder.rglob("*")
                     if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                    key=lambda p: p.relative_to(folder).as_posix())
    pairs, uncaptioned = [], []
    for image in images:
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            uncaptioned.append(image)
            continue
        captions = [line.strip()[:MAX_CAPTION_CHARS] for _, line in read_lines(sidecar) if line.strip()]
        if not captions:
            raise DataError(f"{sidecar} is empty: write one caption per line for {image.name}, or "
                            "delete the sidecar")
        relative = image.relative_to(folder).as_posix()
        pairs.append(Pair(_resolve(relative, folder), tuple(" ".join(c.split()) for c in captions),
                          None, {"source": relative}))
    if uncaptioned:
        log.warning("%s: %d image(s) have no .txt caption sidecar and are left out (e.g. %s)",
                    folder, len(uncaptioned), ", ".join(p.name for p in uncaptioned[:3]))
    if images and not pairs:
        raise DataError(f"{folder}: none of its {len(images)} images has a caption sidecar; write "
                        f"the captions of {images[0].name} into {images[0].with_suffix('.txt').name}, "
                        "one per line")
    return pairs
